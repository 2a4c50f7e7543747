"""Ray Train overhead: the same model, data and batch trained for the same steps (a) by
`raylm pretrain` on 2 Ray Train CPU workers and (b) by a plain `torchrun --nproc_per_node 2`
DDP loop (benchmarks/ddp_baseline.py); mean step time over the same steps, side by side, and
the ratio. raylm's is what its own log records (`step_time_s` per 10-step interval, its
MLflow logging included); the first 10 steps (warm-up) are left out of both.

Usage: python benchmarks/train_overhead.py [--steps 110] [--work DIR]   (steps: a multiple of 10)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 10


def overrides(work: Path, steps: int) -> list[str]:
    return [f"run.output_dir={work / 'runs'}", f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            f"train.max_steps={steps}", f"train.log_interval={WARMUP}", f"train.eval_interval={steps}",
            f"train.checkpoint_interval={steps}", "run.name=overhead"]


def cli(command: str, work: Path, steps: int) -> None:
    args = [sys.executable, "-m", "raylm", command, str(REPO / "configs" / "quickstart.yaml")]
    args += [x for o in overrides(work, steps) for x in ("--set", o)]
    subprocess.run(args, check=True, cwd=work, stdout=subprocess.DEVNULL)


def raylm_step_seconds(work: Path) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raylm").experiment_id],
                                filter_string="tags.mlflow.runName = 'pretrain-overhead'")
    history = sorted(client.get_metric_history(run.info.run_id, "step_time_s"), key=lambda m: m.step)
    return [m.value for m in history]


def torchrun_step_seconds(work: Path, steps: int) -> list[float]:
    from raylm.pipelines.config import load_config
    from raylm.pipelines.pretrain import build_model_config

    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides(work, steps))
    (data_dir,) = (work / "runs" / "data").iterdir()
    manifest = json.loads((data_dir / "manifest.json").read_text())
    model = build_model_config(cfg.model, manifest["vocab_size"])
    (work / "model.json").write_text(json.dumps(model.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as Ray gives a 1-CPU worker
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(REPO / "benchmarks" / "ddp_baseline.py"), str(data_dir),
                          str(work / "model.json"), str(steps), str(cfg.train.batch_size), str(cfg.train.micro_batch_size)],
                         check=True, capture_output=True, text=True, env=env, cwd=work)
    return json.loads(out.stdout.strip().splitlines()[-1])["step_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=110)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="raylm-overhead-"))
    cli("prepare", work, args.steps)
    cli("pretrain", work, args.steps)
    ours = statistics.mean(raylm_step_seconds(work)[1:])  # one value per 10 steps; the first is warm-up
    base = statistics.mean(torchrun_step_seconds(work, args.steps)[WARMUP:])
    print(f"quickstart model, 2 CPU workers, {args.steps} steps, mean step time of steps {WARMUP + 1}-{args.steps}")
    print(f"{'loop':36} {'step s':>8} {'ratio':>7}")
    print(f"{'(b) torchrun DDP, no Ray':36} {base:8.4f} {1.0:6.2f}x")
    print(f"{'(a) raylm pretrain (Ray Train)':36} {ours:8.4f} {ours / base:6.2f}x")


if __name__ == "__main__":
    main()
