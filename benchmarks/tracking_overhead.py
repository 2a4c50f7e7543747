"""What MLflow tracking costs training: the quickstart model trained by raylm's pretrain job on
2 Ray Train CPU workers (a) with every step's metrics sent to a real `mlflow server` on
127.0.0.1 and (b) with tracking off, the same run otherwise, alternating (b, a, b, a, ...) so
that both see the same machine noise. A logger that sends in the training loop can slow it
several-fold; raylm's workers buffer metrics and send them from a background thread every
5 s (pipelines/track/tracking.py: MetricSink). Goal: (a) / (b) <= 1.02.

Per run: the loop's own training seconds (train_seconds at the final evaluation, which both
sides run alike) divided by the steps; the ratio is taken per round, its median and range
printed. Runs last about a minute (200 steps of ~0.35 s on 2 cores), so each (a) run sends about a dozen
batches while it trains. The server runs on the same 2 cores, as do Ray's own processes (~0.2
of a core): whatever the server spends receiving is taken from training here, unlike on a
cluster where it runs elsewhere; its CPU seconds per 1000 steps are printed for both sides.
Every step's train_loss is checked to have reached the server.

Usage: python benchmarks/tracking_overhead.py [--steps 200] [--rounds 3] [--work DIR]
       python benchmarks/tracking_overhead.py --smoke   (10 steps, 1 round: checks that the script runs)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mlflow_server_script():
    """scripts/mlflow_screenshots.py (scripts/ is not a package), for its mlflow_server()."""
    spec = importlib.util.spec_from_file_location("mlflow_screenshots", REPO / "scripts" / "mlflow_screenshots.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, work: Path):
    """The screenshot script's `mlflow server` (one worker, 127.0.0.1), yielding its URL and pid
    (its CPU time is read around each run)."""
    script = mlflow_server_script()
    port = script.free_port()
    with open(work / "server.log", "w+") as log:
        server = script.start_server(backend_store_uri, port, work / "artifacts", log)
        try:
            url = f"http://127.0.0.1:{port}"
            script.wait_until_healthy(url, server, log, 60.0)
            yield url, server.pid
        finally:
            script.stop_process_group(server)


def timed(pid: int, run, *args):
    """run(*args)'s results plus the CPU seconds that the process `pid` and its children spent meanwhile."""
    before = cpu_seconds(pid)
    return *run(*args), cpu_seconds(pid) - before


def cpu_seconds(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def config(work: Path, steps: int, name: str):
    from raylm.config import load_config

    return load_config(
        REPO / "configs" / "quickstart.yaml",
        [
            f"run.output_dir={work / 'runs'}",
            f"run.name={name}",
            f"train.max_steps={steps}",
            "train.log_interval=10",
            f"train.eval_interval={steps}",
            f"train.checkpoint_interval={steps}",
        ],
    )


def seconds_per_step(work: Path, steps: int, name: str, server: str | None) -> tuple[float, int | None]:
    """One pretrain run; with `server`, its metrics go to a new MLflow run there. Returns the
    training seconds per step and, with a server, how many train_loss values arrived."""
    from mlflow.tracking import MlflowClient

    from raylm.pipelines.data.prepare import prepare
    from raylm.pipelines.train.pretrain import build_model_config, pretrain

    cfg = config(work, steps, name)
    manifest = prepare(cfg.data, cfg.tokenizer, Path(cfg.run.output_dir))  # reused after the first run
    tracking, client = None, None
    if server:
        client = MlflowClient(server)
        experiment = client.get_experiment_by_name("tracking-overhead") or client.create_experiment("tracking-overhead")
        experiment_id = experiment if isinstance(experiment, str) else experiment.experiment_id
        tracking = {"uri": server, "run_id": client.create_run(experiment_id, run_name=name).info.run_id}
    model = build_model_config(cfg.model, manifest.vocab_size)
    result, _ = pretrain(model, cfg.train, cfg.scaling, cfg.run, manifest, tracking)
    arrived = None
    if client:
        client.set_terminated(tracking["run_id"])
        arrived = len(client.get_metric_history(tracking["run_id"], "train_loss"))
    return result.metrics["train_seconds"] / steps, arrived


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="10 steps, 1 round: check that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds = 10, 1
    work = args.work or Path(tempfile.mkdtemp(prefix="raylm-tracking-"))
    work.mkdir(parents=True, exist_ok=True)

    from raylm.pipelines.runtime import start_ray

    start_ray()
    rows = []
    with mlflow_server(f"sqlite:///{work / 'server.db'}", work) as (server, pid):
        for r in range(args.rounds):
            off, _, idle = timed(pid, seconds_per_step, work, args.steps, f"off-{r}", None)
            on, arrived, busy = timed(pid, seconds_per_step, work, args.steps, f"on-{r}", server)
            rows.append((off, on, arrived, idle, busy))
    print(
        f"\nquickstart model, 2 CPU workers, {args.steps} steps; rounds alternate (b) off, (a) to a local mlflow server"
    )
    print(
        f"{'round':>5} {'(b) off s/step':>15} {'(a) server s/step':>18} {'ratio':>7} {'losses arrived':>15} "
        f"{'server CPU s per 1000 steps (b) / (a)':>38}"
    )
    for r, (off, on, arrived, idle, busy) in enumerate(rows):
        per_k = 1000 / args.steps
        print(
            f"{r + 1:5d} {off:15.4f} {on:18.4f} {on / off:6.3f}x {arrived:>9}/{args.steps} "
            f"{idle * per_k:>30.2f} / {busy * per_k:.2f}"
        )
    ratios = [on / off for off, on, *_ in rows]
    print(f"median ratio {statistics.median(ratios):.3f}x (range {min(ratios):.3f}-{max(ratios):.3f}); goal <= 1.02x")
    if any(arrived != args.steps for _, _, arrived, *_ in rows):
        raise SystemExit("some steps' metrics never reached the server")


if __name__ == "__main__":
    main()
