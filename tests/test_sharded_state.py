"""Sharded training state without Ray: real torch.distributed process groups (gloo, one
process per rank) run raylm's meta-device init and its checkpoint save and load, so worker
counts and strategies can be mixed in seconds; LoRA checkpoints in one process. The Ray Train
path is in test_faults.py and test_finetune.py."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from raylm.errors import DataError
from raylm.models import GPT, ModelConfig, load_model, save_model
from raylm.models.hf import export_hf, hf_name
from raylm.models.io import load_weights, save_config, weights_digest
from raylm.models.lora import LoraConfig, apply_lora, merge_lora
from raylm.models.stream import save_streaming
from raylm.pipelines.train.checkpoint import BaseRef, Save, load_checkpoint, save_checkpoint, torn_reason
from raylm.pipelines.train.parallelize import materialize, shard

CONFIG = ModelConfig(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16)
WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True)


def run_ranks(world: int, fn, *args) -> None:
    """fn(rank, world, *args) in `world` processes joined in one gloo group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(world, port, fn, args), nprocs=world)


def _rank_main(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def fresh(strategy: str, seed: int = 7) -> tuple[GPT, torch.optim.Optimizer]:
    """The training loop's build: on the meta device, sharded under FSDP, then materialized."""
    with torch.device("meta"):
        model = GPT(CONFIG)
    if strategy == "fsdp":
        shard(model, torch.device("cpu"))
    materialize(model, torch.device("cpu"), seed)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_steps(model: GPT, optimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size), generator=gen)
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad()


def whole_state(model: GPT, optimizer) -> dict[str, torch.Tensor]:
    """Weights and AdamW state as whole tensors (an all-gather under FSDP): the reference."""
    state = {f"model.{k}": v for k, v in get_model_state_dict(model, options=WHOLE).items()}
    optim = get_optimizer_state_dict(model, optimizer, options=WHOLE)
    state.update({f"optim.{k}": v for k, v in optim.items() if isinstance(v, torch.Tensor)})
    return {k: v.detach().clone() for k, v in state.items()}


def _save_whole_init(rank: int, world: int, strategy: str, out: Path) -> None:
    model, optimizer = fresh(strategy)
    state = whole_state(model, optimizer)
    if rank == 0:
        safetensors.torch.save_file({k: v for k, v in state.items() if k.startswith("model.")}, out)


def test_meta_init_is_the_same_on_any_worker_count_and_strategy(tmp_path):
    run_ranks(1, _save_whole_init, "ddp", tmp_path / "one.safetensors")
    run_ranks(2, _save_whole_init, "fsdp", tmp_path / "two.safetensors")
    one, two = (safetensors.torch.load_file(tmp_path / f"{n}.safetensors") for n in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    emb = one["model.tok_emb.weight"]
    assert abs(emb.std().item() - 0.02) < 0.002 and torch.equal(one["model.norm.weight"], torch.ones(CONFIG.n_embd))
    print(f"[test] meta init: {len(one)} tensors equal on 1 plain rank and 2 FSDP ranks")


def _save_fine_tune_init(rank: int, world: int, strategy: str, base: Path, out: Path) -> None:
    """The training loop's build for fine-tuning: meta, LoRA on meta, sharded, then the base read."""
    with torch.device("meta"):
        model = apply_lora(GPT(CONFIG), LoraConfig(rank=2, alpha=4, targets=("wq", "wv")))
    if strategy == "fsdp":
        shard(model, torch.device("cpu"))
    materialize(model, torch.device("cpu"), seed=7, init=base)
    state = whole_state(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    if rank == 0:
        safetensors.torch.save_file({k: v for k, v in state.items() if k.startswith("model.")}, out)


def test_a_fine_tune_reads_its_base_into_each_rank_s_slice(tmp_path):
    """No rank builds the whole base: each reads its slice's rows from the base file. The
    weights equal the base's and the adapters are the same on any worker count (B zero, so the
    adapted model starts as its base)."""
    base = GPT(CONFIG)
    save_model(base, tmp_path / "base")
    run_ranks(1, _save_fine_tune_init, "ddp", tmp_path / "base", tmp_path / "one.safetensors")
    run_ranks(2, _save_fine_tune_init, "fsdp", tmp_path / "base", tmp_path / "two.safetensors")
    one, two = (safetensors.torch.load_file(tmp_path / f"{n}.safetensors") for n in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    weights = {k.removeprefix("model."): v for k, v in one.items() if "lora_" not in k}
    assert weights.keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in weights.items())
    adapters = {k: v for k, v in one.items() if "lora_" in k}
    assert len(adapters) == 2 * 2 * CONFIG.n_layer and all(not v.any() for k, v in adapters.items() if "lora_B" in k)
    assert all(0 < v.abs().max() <= 1 / CONFIG.n_embd**0.5 for k, v in adapters.items() if "lora_A" in k)


def _save(rank: int, world: int, strategy: str, directory: Path, reference: Path, background: bool) -> None:
    model, optimizer = fresh(strategy)
    train_steps(model, optimizer, 2)
    (directory.parent / "tokenizer.json").write_text("{}")
    state = whole_state(model, optimizer)
    # Each rank its own directory, as under Ray Train; the test merges them as Ray's upload does.
    tokenizer = directory.parent / "tokenizer.json"
    save = Save(directory / f"rank{rank}", model, optimizer, {"step": 2}, tokenizer, background=background)
    if background:  # the writes run in a thread on a copy: training on must not reach the files
        train_steps(model, optimizer, 1)
        while not save.written_everywhere(torch.device("cpu")):
            pass
    save.finish()
    if rank == 0:
        safetensors.torch.save_file(state, reference)


def _load(rank: int, world: int, strategy: str, directory: Path, reference: Path) -> None:
    model, optimizer = fresh(strategy, seed=99)  # other initial values: the load must replace them all
    assert load_checkpoint(directory, model, optimizer)["step"] == 2
    state = whole_state(model, optimizer)  # every rank gathers; rank 0 gets it
    if rank == 0:
        expected = safetensors.torch.load_file(reference)
        assert state.keys() == expected.keys()
        assert [k for k in state if not torch.equal(state[k], expected[k])] == []
    train_steps(model, optimizer, 1)  # and it trains on


def merge_rank_directories(directory: Path) -> None:
    for rank_dir in sorted(directory.glob("rank*")):
        for path in sorted(rank_dir.rglob("*")):
            if path.is_file():
                target = directory / path.relative_to(rank_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                path.rename(target)


def test_an_fsdp_checkpoint_reshards_to_any_worker_count_and_strategy(tmp_path):
    """Saved by 2 FSDP ranks in the background (a step trains while the files are written),
    each writing its half; loaded bit for bit by 1 rank, by 2 DDP ranks and by 2 FSDP ranks."""
    ckpt, reference = tmp_path / "checkpoint_000002", tmp_path / "reference.safetensors"
    run_ranks(2, _save, "fsdp", ckpt, reference, True)
    merge_rank_directories(ckpt)
    assert torn_reason(ckpt) is None
    shards = sorted((ckpt / "state").glob("*.safetensors"))  # per rank: one file per block, one for the rest
    assert len(shards) == 2 * (CONFIG.n_layer + 1)
    sizes = [sum(p.stat().st_size for p in shards if p.name.startswith(f"shard-0000{r}-")) for r in (1, 2)]
    whole = sum(t.numel() * t.element_size() for t in safetensors.torch.load_file(reference).values())
    assert all(0.4 * whole < s < 0.6 * whole for s in sizes), (sizes, whole)
    for world, strategy in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
        run_ranks(world, _load, strategy, ckpt, reference)
    print(f"[test] 2 FSDP ranks wrote shards of {sizes} bytes ({whole} whole); 1 rank, 2 DDP, 2 FSDP loaded them")
    shards[-1].unlink()  # rank 1 died before its upload: COMMIT.json, from rank 0, still lists its files
    assert torn_reason(ckpt) == f"state/{shards[-1].name} is missing"


def test_a_ddp_checkpoint_splits_the_writing_and_loads_under_fsdp(tmp_path):
    """Under DDP every rank holds everything; each tensor is written once, by one rank."""
    ckpt, reference = tmp_path / "checkpoint_000002", tmp_path / "reference.safetensors"
    run_ranks(2, _save, "ddp", ckpt, reference, False)
    merge_rank_directories(ckpt)
    names = []
    for path in sorted((ckpt / "state").glob("*.safetensors")):
        with safetensors.safe_open(str(path), "pt") as f:
            names.append((path.name, set(f.keys())))
    by_rank = [set().union(*(n for p, n in names if p.startswith(f"shard-0000{r}-"))) for r in (1, 2)]
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    run_ranks(2, _load, "fsdp", ckpt, reference)


def test_a_lora_checkpoint_holds_the_adapters_and_a_hash_of_its_base(tmp_path):
    """The frozen base is not copied into each checkpoint: the shards hold the adapters and
    their AdamW moments, base.json the base's path and content hash. Loading fetches the base;
    a base whose weights changed is refused, for loading and for resuming."""
    base_dir, ckpt = tmp_path / "base", tmp_path / "checkpoint_000001"
    torch.manual_seed(0)
    save_model(GPT(CONFIG), base_dir)
    lora = LoraConfig(rank=2, alpha=4, dropout=0.0, targets=("wq", "wv"))
    model = apply_lora(load_model(base_dir), lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, optimizer, 2)
    (tmp_path / "tokenizer.json").write_text("{}")
    base = BaseRef(str(base_dir), weights_digest(base_dir))
    save_checkpoint(ckpt, model, optimizer, {"step": 2}, tmp_path / "tokenizer.json", lora, base)

    shards = sum(p.stat().st_size for p in (ckpt / "state").iterdir())
    whole = (base_dir / "model.safetensors").stat().st_size
    adapters = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert shards < 3 * adapters + 64 * 1024 and shards < 0.2 * whole, (shards, adapters, whole)
    x = torch.randint(0, CONFIG.vocab_size, (2, 8))
    trained = model(x)[0]
    torch.testing.assert_close(load_model(ckpt)(x)[0], merge_lora(model)(x)[0])  # the base fetched, merged

    merged = tmp_path / "merged"  # what finetune writes: adapters folded in a block at a time
    save_config(CONFIG, merged)
    save_streaming(ckpt, merged / "model.safetensors")
    assert torch.equal(load_model(merged)(x)[0], load_model(ckpt)(x)[0])
    exported = safetensors.torch.load_file(export_hf(ckpt, tmp_path / "hf") / "model.safetensors")
    expected = {hf_name(k): v for k, v in load_model(ckpt).state_dict().items() if k != "lm_head.weight"}
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
    with pytest.raises(DataError, match="holds LoRA adapters this model has not"):
        load_weights(GPT(CONFIG), ckpt)  # as finetune.base: the adapters would be dropped
    again = apply_lora(load_model(base_dir), lora)
    resumed = torch.optim.AdamW([p for p in again.parameters() if p.requires_grad], lr=1e-2)
    assert load_checkpoint(ckpt, again, resumed, base)["step"] == 2
    assert torch.equal(again(x)[0], trained)

    with safetensors.safe_open(str(base_dir / "model.safetensors"), "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
    weights["norm.weight"] = weights["norm.weight"] * 2
    safetensors.torch.save_file(weights, base_dir / "model.safetensors")  # the base changed in place
    with pytest.raises(DataError, match="whose weights have changed"):
        load_model(ckpt)
    changed = BaseRef(str(base_dir), weights_digest(base_dir))
    with pytest.raises(DataError, match="trained from another base"):
        load_checkpoint(ckpt, again, resumed, changed)
    print(f"[test] LoRA checkpoint: {shards:,} bytes of shards against a {whole:,}-byte base")
