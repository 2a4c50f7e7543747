"""The training stage: `pretrain` and `finetune` launch Ray Train workers that run `loop`, on a
model that `parallelize` wraps in DDP or FSDP2, with `optim`'s AdamW and schedules. State goes
through `checkpoint` (safetensors only), `cost` measures MFU and dollars, and `interrupt` turns
SIGTERM into a clean checkpoint-and-stop.

May import data, eval and track; nothing imports train but jobs and tuning."""
