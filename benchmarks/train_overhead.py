"""Ray Train overhead: the same model, data and batch trained for the same steps (a) by
`raylm pretrain` on 2 Ray Train CPU workers and (b) by a plain `torchrun --nproc_per_node 2`
DDP loop (benchmarks/ddp_baseline.py), alternating (b, a, b, a, ...) so that both see the same
machine noise. Per run: the median over 10-step intervals of the mean step time (raylm's is
what its own log records, `step_time_s`, MLflow logging included), leaving out the first
interval (warm-up). The ratio is taken per round and its median printed.

While each run trains, the CPU time of every process is sampled from /proc and grouped
(training processes, Ray Train's helper actors, Ray's system processes, the driver): on 2
cores, whatever else runs is taken from the training workers, so this is where the overhead
comes from.

Usage: python benchmarks/train_overhead.py [--steps 110] [--rounds 2] [--work DIR]   (steps: a multiple of 10)
       python benchmarks/train_overhead.py --smoke   (20 steps, 1 round: checks that the script runs;
                                                      its figures mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 10


def overrides(work: Path, steps: int, name: str = "overhead") -> list[str]:
    return [
        f"run.output_dir={work / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        f"train.max_steps={steps}",
        f"train.log_interval={WARMUP}",
        f"train.eval_interval={steps}",
        f"train.checkpoint_interval={steps}",
        f"run.name={name}",
    ]


def cli(command: str, work: Path, steps: int, name: str) -> None:
    args = [sys.executable, "-m", "raylm", command, str(REPO / "configs" / "quickstart.yaml")]
    args += [x for o in overrides(work, steps, name) for x in ("--set", o)]
    subprocess.run(args, check=True, cwd=work, stdout=subprocess.DEVNULL)


def raylm_step_seconds(work: Path, name: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    from raylm.pipelines.track.runs import latest_run

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run = latest_run(client, "raylm", name, "pretrain")
    history = sorted(client.get_metric_history(run.info.run_id, "step_time_s"), key=lambda m: m.step)
    return [m.value for m in history]


def torchrun_step_seconds(work: Path, steps: int) -> list[float]:
    from raylm.config import load_config
    from raylm.pipelines.data.manifest import Manifest
    from raylm.pipelines.train.pretrain import build_model_config

    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides(work, steps))
    (data_dir,) = (work / "runs" / "data").iterdir()
    model = build_model_config(cfg.model, Manifest.load(data_dir).vocab_size)
    (work / "model.json").write_text(json.dumps(model.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as Ray gives a 1-CPU worker
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(REPO / "benchmarks" / "ddp_baseline.py"),
            str(data_dir),
            str(work / "model.json"),
            str(steps),
            str(cfg.train.batch_size),
            str(cfg.train.micro_batch_size),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["step_seconds"]


class CpuSampler:
    """CPU seconds per process group while a run trains, read from /proc every 0.5 s."""

    GROUPS = (
        ("training workers", ("ray::RayTrainWorker", "ddp_baseline.py")),
        (
            "Ray system (raylet, GCS, dashboard, agents)",
            ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "Agent"),
        ),
        ("Ray Train controller and helper actors", ("ray::",)),
        ("driver (raylm / torchrun)", ("-m raylm", "torch.distributed.run")),
    )

    def __init__(self):
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self._stop.wait(0.5):
            snapshot = {}
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                snapshot[int(pid)] = (cmd, (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
            self.samples.append((time.monotonic(), snapshot))

    @classmethod
    def group_of(cls, cmd: str) -> str | None:
        for name, needles in cls.GROUPS:
            if any(n in cmd for n in needles):
                return name
        return None

    def breakdown(self, by=None) -> dict[str, float]:
        """Cores used per group (or per `by(cmdline)`) over the window in which training
        processes existed; a process that starts or ends inside it counts from its first to
        its last sample."""
        by = by or (lambda cmd: self.group_of(cmd) or "other processes")
        busy = [
            i
            for i, (_, snap) in enumerate(self.samples)
            if any(self.group_of(cmd) == "training workers" for cmd, _ in snap.values())
        ]
        if len(busy) < 2:
            return {}
        window = self.samples[busy[0] : busy[-1] + 1]
        first: dict[int, float] = {}
        last: dict[int, tuple[str, float]] = {}
        for _, snap in window:
            for pid, (cmd, cpu) in snap.items():
                first.setdefault(pid, cpu if snap is window[0][1] else 0.0)
                # An exiting process reads as an empty cmdline: keep the name it had.
                last[pid] = (cmd or last.get(pid, ("", 0.0))[0], cpu)
        used: dict[str, float] = {}
        for pid, (cmd, cpu) in last.items():
            used[by(cmd)] = used.get(by(cmd), 0.0) + cpu - first[pid]
        return {key: seconds / (window[-1][0] - window[0][0]) for key, seconds in used.items()}


def wait_for_quiet(timeout: float = 60.0) -> None:
    """Start each run only once the last one's processes (Ray's take seconds to exit) are gone,
    so that neither side pays for the other's shutdown."""
    needles = ("raylet", "gcs_server", "ray::", "ddp_baseline.py", "dashboard")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            alive = alive or any(n in cmd for n in needles)
        if not alive:
            return
        time.sleep(0.5)


def interval_median(step_seconds: list[float]) -> float:
    """Median of the 10-step interval means, the first (warm-up) interval left out."""
    means = [statistics.mean(step_seconds[i : i + WARMUP]) for i in range(WARMUP, len(step_seconds), WARMUP)]
    return statistics.median(means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=110)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="20 steps, 1 round: check that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds = 20, 1
    work = args.work or Path(tempfile.mkdtemp(prefix="raylm-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    cli("prepare", work, args.steps, "overhead")
    rows = []
    # A smoke run (in the test suite) shares the machine with the session's Ray, which never goes quiet.
    quiet = (lambda: None) if args.smoke else wait_for_quiet
    for r in range(args.rounds):
        quiet()
        with CpuSampler() as base_cpu:
            base = interval_median(torchrun_step_seconds(work, args.steps))
        quiet()
        with CpuSampler() as ours_cpu:
            cli("pretrain", work, args.steps, f"overhead-{r}")
        ours = statistics.median(raylm_step_seconds(work, f"overhead-{r}")[1:])  # one value per 10 steps
        rows.append((base, ours, base_cpu.breakdown(), ours_cpu.breakdown()))

        def name(cmd: str) -> str:
            training = CpuSampler.group_of(cmd) == "training workers"
            return "training workers" if training else " ".join(cmd.split(" ")[:2])[-48:]

        processes = {"(b)": base_cpu.breakdown(by=name), "(a)": ours_cpu.breakdown(by=name)}
    print(
        f"\nquickstart model, 2 CPU workers, {args.steps} steps; median over 10-step intervals of steps "
        f"{WARMUP + 1}-{args.steps}; rounds alternate (b), (a)"
    )
    print(f"{'round':>5} {'(b) torchrun s':>15} {'(a) raylm s':>12} {'ratio':>7}")
    for r, (base, ours, _, _) in enumerate(rows):
        print(f"{r + 1:5d} {base:15.4f} {ours:12.4f} {ours / base:6.2f}x")
    print(f"median ratio: {statistics.median(o / b for b, o, _, _ in rows):.2f}x")
    groups = sorted({g for *_, bc, oc in rows for g in (*bc, *oc)})
    print("\nCPU cores used while training (of 2), mean over rounds:")
    print(f"{'process group':45} {'(b) torchrun':>13} {'(a) raylm':>10}")
    for g in groups:
        b = statistics.mean(row[2].get(g, 0.0) for row in rows)
        o = statistics.mean(row[3].get(g, 0.0) for row in rows)
        print(f"{g:45} {b:13.2f} {o:10.2f}")
    for side, used in processes.items():
        print(f"\nbusiest processes beside the training workers, {side}, last round (cores):")
        others = [(n, c) for n, c in used.items() if n != "training workers"]
        for name, cores in sorted(others, key=lambda kv: -kv[1])[:6]:
            print(f"  {name:48} {cores:.3f}")


if __name__ == "__main__":
    main()
