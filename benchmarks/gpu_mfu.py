"""GPU throughput: the GPT-2 124M preset, bf16 autocast, seq 1024, trained by `raylm pretrain`
on one GPU worker; tokens/s and MFU (against the device's bf16 dense peak in
pipelines/train/cost.py), eager and with train.compile, side by side.

Target: >= 45% MFU on one H100 (llm.c reaches about 40%). The corpus is raylm's
built-in grammar (generated offline, so the script runs on a machine without network);
its small vocabulary is padded to GPT-2's 50,304 so that the model has GPT-2's shape and FLOPs.

Usage: python benchmarks/gpu_mfu.py [--steps 60] [--micro 16] [--work DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# --smoke without a GPU: the same commands and lookups on CPU with a 1-layer model for 20
# steps, eager only (compiling on CPU would take minutes); it checks the script, and its
# figures mean nothing. With a GPU, --smoke keeps the 124M model and runs 20 steps of each mode.
CPU_SMOKE = [
    "model.preset=null",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_kv_head=2",
    "model.n_embd=64",
    "model.block_size=64",
    "data.seq_len=64",
    "data.grammar.num_docs=2000",
    "tokenizer.vocab_size=300",
    "scaling.use_gpu=false",
    "scaling.cpus_per_worker=1",
]


def overrides(work: Path, args, compile: bool) -> list[str]:
    return [
        f"run.output_dir={work / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        f"run.name=mfu-{'compiled' if compile else 'eager'}",
        "model.vocab_size=50304",
        "data.grammar.num_docs=40000",
        "tokenizer.vocab_size=2048",
        "data.val_fraction=0.02",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.micro}",
        f"train.micro_batch_size={args.micro}",
        "train.batch_tokens=null",
        "train.warmup_steps=10",
        "train.log_interval=10",
        f"train.eval_interval={args.steps}",
        "train.eval_windows=32",
        f"train.checkpoint_interval={args.steps}",
        "train.max_usd=null",
        f"train.compile={str(compile).lower()}",
        "scaling.num_workers=1",
        "scaling.use_gpu=true",
        "scaling.cpus_per_worker=8",
        "scaling.max_failures=0",
        *(CPU_SMOKE if args.smoke and not gpu_present() else []),
    ]


def gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def raylm(command: str, work: Path, args, compile: bool) -> None:
    cli = [sys.executable, "-m", "raylm", command, str(REPO / "configs" / "gpt2-124m.yaml")]
    subprocess.run(cli + [x for o in overrides(work, args, compile) for x in ("--set", o)], check=True, cwd=work)


def interval_metrics(work: Path, compile: bool) -> dict[str, float]:
    """Medians over the logged intervals after the first (warm-up, and compilation)."""
    from mlflow.tracking import MlflowClient

    from raylm.pipelines.track.runs import latest_run

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run = latest_run(client, "raylm", f"mfu-{'compiled' if compile else 'eager'}", "pretrain")

    def median(key):
        return statistics.median(  # noqa: E731
            m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)[1:]
        )

    return {key: median(key) for key in ("tokens_per_s", "mfu", "step_time_s", "memory_gb")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro", type=int, default=16, help="sequences of 1024 tokens per step")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="20 steps; on CPU a tiny model, eager only")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.micro = 20, min(args.micro, 4)
    work = args.work or Path(tempfile.mkdtemp(prefix="raylm-gpu-"))
    raylm("prepare", work, args, False)
    rows = {}
    for compile in (False,) if args.smoke and not gpu_present() else (False, True):
        raylm("pretrain", work, args, compile)
        rows["compiled" if compile else "eager"] = interval_metrics(work, compile)
    print(f"\nGPT-2 124M preset, bf16, seq 1024, {args.micro} sequences/step, 1 GPU (medians after the first interval)")
    print(f"{'mode':10} {'tokens/s':>12} {'MFU':>7} {'step s':>8} {'GB':>6}")
    for mode, m in rows.items():
        print(f"{mode:10} {m['tokens_per_s']:12,.0f} {m['mfu']:6.1%} {m['step_time_s']:8.3f} {m['memory_gb']:6.1f}")


if __name__ == "__main__":
    main()
