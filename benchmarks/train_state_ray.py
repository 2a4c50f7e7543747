"""Peak memory of each Ray Train rank in a launch that saves a checkpoint and in the launch that
resumes from it: `raylm pretrain` itself, FSDP2 on 2 CPU workers, an ~82M-parameter model (8
layers, 768 wide, a 16k vocabulary). Each rank prints its peak resident memory (ru_maxrss) when
its loop ends; this script reads those lines.

  save    a fresh run: 2 steps, a checkpoint at step 2
  resume  the same run name relaunched for a third step: Ray Train hands back the checkpoint,
          each rank reads its slices of it, trains one step and saves again

Before checkpoints were sharded (2026-12), the same kind of launch (85M parameters) on the
gather path (whole-model build, rank-0 gather on save, whole reads on resume) measured: the
ranks' peaks 1.10x apart in the saving launch and 1.24x in the resuming one, and the resuming
launch 1.27x higher than the saving one.
The sharded path should bring both skews and the resume/save ratio to about 1.

One Ray instance serves every launch (the launches run in this process, as raylm's CLI would,
with their output captured from file descriptor 1).

Usage: python benchmarks/train_state_ray.py [--layers 8 --dim 768 --vocab 16384] [--work DIR]
       python benchmarks/train_state_ray.py --smoke   (a 2-layer model: checks that it runs)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK = re.compile(r"\[train\] rank (\d+) of (\d+): peak memory ([\d,]+) MB")


def overrides(work: Path, args: argparse.Namespace) -> list[str]:
    return [
        f"run.output_dir={work / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        "tracking.log_model=false",  # the export runs in the driver; this measures the ranks
        "run.name=state",
        "data.grammar.num_docs=3000",
        "data.seq_len=128",
        f"tokenizer.vocab_size={min(args.vocab, 2048)}",  # the grammar needs few; the model has --vocab
        f"model.vocab_size={args.vocab}",
        f"model.n_layer={args.layers}",
        f"model.n_embd={args.dim}",
        f"model.n_head={max(1, args.dim // 64)}",
        f"model.n_kv_head={max(1, args.dim // 64)}",
        "model.block_size=128",
        "scaling.num_workers=2",
        "scaling.strategy=fsdp",
        "train.batch_size=4",
        "train.micro_batch_size=2",
        "train.warmup_steps=1",
        "train.log_interval=1",
        "train.eval_interval=100",
        "train.eval_windows=8",
        "train.checkpoint_interval=2",
    ]


def launch(command: str, work: Path, args: argparse.Namespace, extra: list[str]) -> str:
    """`raylm <command>` in this process; everything it and its workers print."""
    from raylm.cli import main

    config = str(REPO / "configs" / "quickstart.yaml")
    argv = [command, config, *[x for o in [*overrides(work, args), *extra] for x in ("--set", o)]]
    with tempfile.TemporaryFile(mode="w+") as sink:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(sink.fileno(), 1)
        try:
            code = main(argv)
            time.sleep(3)  # Ray forwards the workers' lines to this process a second or more late
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        sink.seek(0)
        out = sink.read()
    if code != 0:
        raise SystemExit(f"raylm {command} exited {code}:\n{out[-3000:]}")
    return out


def peaks(out: str) -> dict[int, float]:
    found = {int(rank): float(mb.replace(",", "")) for rank, _, mb in PEAK.findall(out)}
    if sorted(found) != [0, 1]:
        raise SystemExit(f"expected a peak-memory line from ranks 0 and 1, found {sorted(found)}:\n{out[-3000:]}")
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--work", type=Path)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.layers, args.dim, args.vocab = 2, 64, 512
    work = args.work or Path(tempfile.mkdtemp(prefix="raylm-train-state-"))
    # Ray folds lines that differ only in numbers ("rank 1 ... 558 MB" after "rank 0 ... 615 MB")
    # into one "[repeated 2x across cluster]" printed later: every rank's line is wanted now.
    os.environ["RAY_DEDUP_LOGS"] = "0"
    params = args.layers * 12 * args.dim**2 + 2 * args.vocab * args.dim
    print(f"model: {args.layers} layers, {args.dim} wide, vocab {args.vocab}: ~{params / 1e6:.0f}M parameters")
    print(f"weights + AdamW: {params * 12 / 1e6:,.0f} MB, {params * 6 / 1e6:,.0f} MB per rank of 2", flush=True)
    launch("prepare", work, args, [])
    saved = peaks(launch("pretrain", work, args, ["train.max_steps=2"]))
    out = launch("pretrain", work, args, ["train.max_steps=3"])
    if "resumed from" not in out:
        raise SystemExit(f"the second launch did not resume:\n{out[-3000:]}")
    resumed = peaks(out)
    print("| launch | rank 0 | rank 1 | rank 0 / rank 1 |")
    print("|---|---:|---:|---:|")
    for name, got in (("save", saved), ("resume", resumed)):
        print(f"| {name} | {got[0]:,.0f} MB | {got[1]:,.0f} MB | {got[0] / got[1]:.2f}x |")
    skew = [max(got.values()) / min(got.values()) for got in (saved, resumed)]
    ratio = max(resumed.values()) / max(saved.values())
    print(f"ranks' peaks differ by {skew[0]:.2f}x saving, {skew[1]:.2f}x resuming (gather path: 1.10x, 1.24x)")
    print(f"resume / save, highest rank: {ratio:.2f}x (gather path: 1.27x)")


if __name__ == "__main__":
    main()
