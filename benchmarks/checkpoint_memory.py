"""Peak memory of each rank while it saves and while it resumes a checkpoint, under FSDP2 on
2 CPU ranks: the gather path raylm used until 2026-12 against the sharded one it uses now.

  gather  (pipelines/train/checkpoint.py before 2026-12) every rank builds the whole fp32 model
          and shards it; a save all-gathers the whole weights and AdamW state to rank 0, which
          writes them; a resume reads the whole files on every rank and keeps its shard.
  sharded (now) the model is built on the meta device and each rank draws only its shard
          (parallelize.materialize); each rank writes and reads only its shard
          (checkpoint.save_checkpoint / load_checkpoint).

Each phase runs in fresh processes joined in a gloo group (torch.multiprocessing, no Ray):
save = build + one training step (so AdamW state exists) + the save; resume = build + the
load (torch's get_optimizer_state_dict first gives a fresh AdamW its zero moments, through
zero gradients, so the load has tensors to fill). A rank's peak is VmHWM (resident set,
file-backed pages included), reset through /proc/self/clear_refs before the part it
measures. "base" is a rank's resident set before it builds anything (Python, torch, the
process group).

A sharded rank then saves again in the background (train.async_save), for the seconds a step
waits. Last, export-hf of the sharded checkpoint in one process: the whole model loaded and written
at once (as before 2026-12) against a block at a time (models/stream.py).

Usage: python benchmarks/checkpoint_memory.py [--layers 24 --dim 1024 --vocab 32000] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from raylm.models import GPT, ModelConfig, load_model
from raylm.models.hf import export_hf, hf_name
from raylm.pipelines.train.checkpoint import Save, load_checkpoint, save_checkpoint
from raylm.pipelines.train.parallelize import materialize, shard

WORLD = 2
CPU = torch.device("cpu")
WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def peak_mb() -> float:
    return status_mb("VmHWM")


def reset_peak() -> float:
    """VmHWM := the current resident set, which is returned."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_mb("VmRSS")


def build(config: ModelConfig, path: str) -> tuple[GPT, torch.optim.Optimizer]:
    if path == "gather":
        torch.manual_seed(0)
        model = GPT(config)  # the whole fp32 model on every rank, then sharded
        shard(model, CPU)
    else:
        with torch.device("meta"):
            model = GPT(config)
        shard(model, CPU)
        materialize(model, CPU, seed=0)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def gather_save(directory: Path, model: GPT, optimizer) -> None:
    """What a save did before 2026-12: every rank joins the all-gather, rank 0 writes."""
    weights = get_model_state_dict(model, options=WHOLE)
    optim = get_optimizer_state_dict(model, optimizer, options=WHOLE)
    if dist.get_rank() == 0:
        safetensors.torch.save_file({k: v for k, v in weights.items() if k != "tok_emb.weight"}, directory / "w")
        moments = {f"{n}.{f}": t for n, s in optim["state"].items() for f, t in s.items()}
        safetensors.torch.save_file(moments, directory / "o")
        (directory / "groups.json").write_text(json.dumps(optim["param_groups"]))


def gather_load(directory: Path, model: GPT, optimizer) -> None:
    """What a resume did before 2026-12: every rank reads the whole files, keeps its shard."""
    weights = safetensors.torch.load_file(directory / "w")
    weights["tok_emb.weight"] = weights["lm_head.weight"]
    set_model_state_dict(model, weights, options=WHOLE)
    state: dict[str, dict] = {}
    for key, t in safetensors.torch.load_file(directory / "o").items():
        name, _, field = key.rpartition(".")
        state.setdefault(name, {})[field] = t
    groups = json.loads((directory / "groups.json").read_text())
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=WHOLE)


def background_save(directory: Path, model: GPT, optimizer, tokenizer: Path) -> dict:
    """train.async_save: how long the step waits (the copy of the state to host memory), the
    peak meanwhile, and how long until the files are written (the training loop would go on)."""
    dist.barrier()
    reset_peak()
    t0 = time.perf_counter()
    save = Save(directory, model, optimizer, {"step": 1}, tokenizer, background=True)
    blocked = time.perf_counter() - t0
    while not save.written_everywhere(CPU):
        time.sleep(0.05)
    save.finish()
    return {"async_blocked_s": blocked, "async_written_s": time.perf_counter() - t0, "async_peak": peak_mb()}


def rank_main(rank: int, port: int, phase: str, path: str, config: dict, work: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    base = peak_mb()
    reset_peak()
    model, optimizer = build(ModelConfig(**config), path)
    out = {"base": base, "build": peak_mb()}
    directory = Path(work) / path
    tokenizer = Path(work) / "tokenizer.json"
    if phase == "save":
        x = torch.randint(0, config["vocab_size"], (1, 32))
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        out["held"] = reset_peak()  # the step's freed memory stays with the process (the allocator keeps it)
        t0 = time.perf_counter()
        if path == "gather":
            directory.mkdir(parents=True, exist_ok=True)
            gather_save(directory, model, optimizer)
        else:
            save_checkpoint(directory, model, optimizer, {"step": 1}, tokenizer)
        dist.barrier()
        out.update(save=peak_mb(), save_s=time.perf_counter() - t0)
        if path == "sharded":
            out.update(background_save(directory.with_name("async"), model, optimizer, tokenizer))
    else:
        dist.barrier()
        reset_peak()
        t0 = time.perf_counter()
        (gather_load if path == "gather" else load_checkpoint)(directory, model, optimizer)
        dist.barrier()
        out.update(load=peak_mb(), load_s=time.perf_counter() - t0)
    Path(work, f"{phase}-{path}-{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def export_main(index: int, how: str, work: str) -> None:
    """export-hf of the sharded checkpoint in a fresh process: the whole model loaded and
    written at once (as before 2026-12), or a block at a time (models/stream.py)."""
    torch.set_num_threads(1)
    checkpoint, out = Path(work) / "sharded", Path(work) / f"hf-{how}"
    base = reset_peak()
    if how == "whole":
        model = load_model(checkpoint)
        out.mkdir(exist_ok=True)
        tensors = {hf_name(k): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        safetensors.torch.save_file(tensors, out / "model.safetensors")
    else:
        export_hf(checkpoint, out)
    Path(work, f"export-{how}.json").write_text(json.dumps({"base": base, "peak": peak_mb()}))


def run_phase(phase: str, path: str, config: dict, work: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(port, phase, path, config, str(work)), nprocs=WORLD)
    return [json.loads((work / f"{phase}-{path}-{r}.json").read_text()) for r in range(WORLD)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--work", type=Path, default=None, help="where the checkpoints go (default: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model: checks the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.dim, args.vocab = 2, 64, 512
    config = ModelConfig(
        vocab_size=args.vocab, n_layer=args.layers, n_head=max(1, args.dim // 64), n_embd=args.dim, block_size=64
    )
    with torch.device("meta"):
        params = GPT(config).num_params()
    full_mb = params * 12 / 2**20  # fp32 weights + AdamW's two moments
    training_mb = params * 16 / 2**20  # and the gradients, which a training rank holds too
    work = args.work or Path(tempfile.mkdtemp(prefix="raylm-ckpt-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "tokenizer.json").write_text("{}")
    print(f"model: {params / 1e6:.0f}M parameters; full state (weights + AdamW) {full_mb:.0f} MB; {WORLD} FSDP2 ranks")
    rows = {}
    for path in ("gather", "sharded"):
        saved = run_phase("save", path, config.to_dict(), work)
        resumed = run_phase("resume", path, config.to_dict(), work)
        rows[path] = [
            {**s, "resume": max(r["build"], r["load"]), "load_s": r["load_s"]} for s, r in zip(saved, resumed)
        ]
    report(rows, full_mb, training_mb)
    exports = {}
    for how in ("whole", "streaming"):
        mp.spawn(export_main, args=(how, str(work)), nprocs=1)
        exports[how] = json.loads((work / f"export-{how}.json").read_text())
    weights_mb = params * 4 / 2**20
    print(f"\nexport-hf of the sharded checkpoint, one process ({weights_mb:.0f} MB of fp32 weights):")
    for how, e in exports.items():
        print(f"  {how}: peak {e['peak']:.0f} MB, {e['peak'] - e['base']:.0f} MB over the process before it")


def report(rows: dict, full_mb: float, training_mb: float) -> None:
    share, training = full_mb / WORLD, training_mb / WORLD
    print(f"\npeak resident MB per rank (full state / {WORLD} = {share:.0f} MB; with gradients {training:.0f} MB)")
    print(
        "| path | rank | base | build | before save | save | resume | save - base | resume - base | save s | load s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for path, ranks in rows.items():
        for rank, r in enumerate(ranks):
            print(
                f"| {path} | {rank} | {r['base']:.0f} | {r['build']:.0f} | {r['held']:.0f} | {r['save']:.0f} | "
                f"{r['resume']:.0f} | {r['save'] - r['base']:.0f} | {r['resume'] - r['base']:.0f} | "
                f"{r['save_s']:.2f} | {r['load_s']:.2f} |"
            )
    for path, ranks in rows.items():
        worst = max(max(r["save"], r["resume"]) - r["base"] for r in ranks)
        skew = max(ranks[0]["save"], ranks[0]["resume"]) / max(ranks[1]["save"], ranks[1]["resume"])
        print(
            f"{path}: largest peak over base {worst:.0f} MB = share + {worst - share:.0f} MB "
            f"= share with gradients + {worst - training:.0f} MB; rank 0 / other rank {skew:.2f}x"
        )
    r = rows["sharded"][0]
    print(
        f"a step blocked by a save (rank 0): {r['save_s']:.2f} s written in the foreground, "
        f"{r['async_blocked_s']:.2f} s in the background ({r['async_blocked_s'] / r['save_s']:.2f}x; the files "
        f"were written {r['async_written_s']:.2f} s after the save began; peak {r['async_peak']:.0f} MB)"
    )
    print(
        "sharded / gather: save seconds {:.2f}x, load seconds {:.2f}x (rank 0)".format(
            rows["sharded"][0]["save_s"] / rows["gather"][0]["save_s"],
            rows["sharded"][0]["load_s"] / rows["gather"][0]["load_s"],
        )
    )


if __name__ == "__main__":
    sys.exit(main())
