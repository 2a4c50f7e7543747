"""The baseline of benchmarks/train_overhead.py: a plain DDP training loop for
`torchrun --nproc_per_node 2`, no Ray. Same model, data order, optimizer and batch as
raylm's loop; prints one JSON line with rank 0's per-step seconds.

Usage: torchrun --nproc_per_node 2 benchmarks/ddp_baseline.py DATA_DIR MODEL_JSON STEPS BATCH MICRO
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from raylm.config import TrainSection
from raylm.models import GPT, ModelConfig
from raylm.pipelines.data.loader import WindowLoader, WindowStore
from raylm.pipelines.train.optim import lr_at, make_optimizer, set_lr


def main() -> None:
    data_dir, model_json, steps, batch, micro = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TrainSection(max_steps=steps, batch_size=batch, micro_batch_size=micro)
    torch.manual_seed(1337)
    model = GPT(ModelConfig(**json.loads(open(model_json).read())))
    ddp = DistributedDataParallel(model)
    optimizer = make_optimizer(model, cfg)
    loader = WindowLoader(WindowStore.open(f"{data_dir}/train"), micro, rank, world, seed=1337)
    accum = batch // (micro * world)
    seconds = []
    for step in range(steps):
        t0 = time.perf_counter()
        set_lr(optimizer, lr_at(step, cfg))
        for i in range(accum):
            x, y = loader.next_batch()
            if i < accum - 1:
                with ddp.no_sync():
                    (ddp(x, y)[1] / accum).backward()
            else:
                (ddp(x, y)[1] / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"step_seconds": seconds}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
