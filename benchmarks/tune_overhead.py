"""Ray Tune's bookkeeping overhead in `raylm tune`: the sweep's wall time against the time its
trials needed, sum(trial time) / concurrency, measured in the same sweep. A trial's time is
Tune's `time_total_s`: the trial function's own run, from its start to its return (Train's
worker start-up, training, evaluation and checkpoints included). What is left over is Tune's:
starting a process per trial, scheduling, result handling, experiment checkpoints, and the
gaps between one trial ending and the next starting.

Two sweeps, side by side in one invocation, of 8 trials each (tiny GPT, 1 Train worker per
trial, 2 trials at once on 2 CPUs, FIFO so that every trial runs to its end), with short and
long trials: the overhead per trial is about constant, so its share falls as trials grow.
Ray documents +14% for 10,000 one-second trials (tune-scalability docs).

Usage: python benchmarks/tune_overhead.py [--steps 40 200] [--trials 8] [--work DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.grammar.num_docs=4000",
    "model.n_layer=2",
    "model.n_embd=64",
    "model.block_size=64",
    "data.seq_len=64",
    "train.batch_size=16",
    "train.micro_batch_size=8",
    "train.warmup_steps=5",
    "train.log_interval=20",
    "scaling.num_workers=1",
    "eval.sample_tokens=0",
]


def run_sweep(work: Path, steps: int, trials: int) -> dict:
    name = f"overhead-{steps}"
    space = {
        "search": {"algorithm": "random", "num_samples": trials, "seed": 0},
        "scheduler": {"name": "fifo"},
        "space": {"train.lr": {"loguniform": [1e-3, 1e-2]}, "train.max_steps": steps, "train.eval_interval": steps},
    }
    (work / f"{name}.yaml").write_text(yaml.safe_dump(space))
    sets = TINY + [
        f"run.name={name}",
        f"run.output_dir={work / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
    ]
    args = [
        sys.executable,
        "-m",
        "raylm",
        "tune",
        str(REPO / "configs" / "quickstart.yaml"),
        "--space",
        str(work / f"{name}.yaml"),
    ]
    subprocess.run(args + [x for s in sets for x in ("--set", s)], check=True, cwd=work, stdout=subprocess.DEVNULL)
    return sweep_metrics(work, name)


def sweep_metrics(work: Path, name: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("raylm").experiment_id],
        filter_string=f"tags.`raylm.sweep` = '{name}' and tags.`raylm.stage` = 'tune'",
    )
    return run.data.metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[40, 200], help="training steps per trial, one sweep each"
    )
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--work", type=Path, help="keep the outputs here (default: a temporary directory)")
    parser.add_argument("--smoke", action="store_true", help="one sweep of 2 trials of 10 steps: check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.trials = [10], 2
    work = args.work or Path(tempfile.mkdtemp(prefix="raylm-tune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"{'steps/trial':>11} {'trials':>6} {'sweep wall s':>12} {'sum(trial s)/2':>14} {'overhead':>8} {'s/trial':>8}"
    )
    for steps in args.steps:
        m = run_sweep(work, steps, args.trials)
        wall, ratio = m["sweep_wall_seconds"], m["tune_overhead_ratio"]
        busy = wall / ratio
        per_trial = (wall - busy) * 2 / args.trials  # 2 trials at once on 2 CPUs
        print(f"{steps:>11} {args.trials:>6} {wall:>12.1f} {busy:>14.1f} {ratio:>7.2f}x {per_trial:>8.1f}", flush=True)
    print(
        "overhead = sweep wall / (sum of trial times / concurrency); target <= 1.10x; "
        "s/trial: Tune's seconds per trial beyond the trial's own run"
    )


if __name__ == "__main__":
    main()
