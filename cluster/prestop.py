"""The head pod's preStop hook: stop the raylm driver the way `ray job stop` does, before
Kubernetes stops the pod.

An eviction or a node drain sends SIGTERM to each container's first process, which on a Ray
head is `ray start --block`, not the driver: Ray's processes go down and the driver with them,
mid-step and without a checkpoint. Kubernetes runs a container's preStop hook first, inside the
pod's terminationGracePeriodSeconds (cluster.stop_grace_seconds, written by render). This hook
sends SIGTERM to every raylm driver in the container, which finishes its step, checkpoints
and ends its MLflow run KILLED (pipelines/train/interrupt.py), and waits for them to exit, so
the pod's SIGTERM comes after the checkpoint. No Ray, no torch: it reads /proc.

Usage (what the rendered pod runs): python -m raylm.cluster.prestop [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

# The CLI commands that train or write a run's outputs: what a RayJob's entrypoint runs.
DRIVER_COMMANDS = ("run", "prepare", "pretrain", "finetune", "evaluate", "tune")


def is_driver(argv: list[str]) -> bool:
    """`raylm pretrain ...` (the console script) or `python -m raylm pretrain ...`."""
    for i, arg in enumerate(argv[:-1]):
        entry = Path(arg).name == "raylm" or (arg == "raylm" and i > 0 and argv[i - 1] == "-m")
        if entry and argv[i + 1] in DRIVER_COMMANDS:
            return True
    return False


def drivers(under: int | None = None) -> list[int]:
    """Pids of the raylm drivers running in this container (its /proc), this process excluded;
    with `under`, only those descending from that pid."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone, or not ours to read
            continue
        pid = int(entry)
        if pid != os.getpid() and is_driver([a for a in argv if a]) and (under is None or descends(pid, under)):
            found.append(pid)
    return found


def descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the parent
        except (OSError, ValueError):
            return False
        if pid == ancestor:
            return True
    return False


def alive(pid: int) -> bool:
    """Whether any thread of the process still runs. Its first thread alone does not tell: a
    raylm driver's shows Z (exited) while Ray's threads keep the process going, and a process
    that has exited but not been waited for shows Z in every thread."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            if Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return True
        except OSError:
            continue
    return False


def stop_drivers(timeout: float, under: int | None = None) -> int:
    """SIGTERM to every driver, then wait up to `timeout` s for all to exit; returns how many were stopped."""
    pids = drivers(under)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    print(f"[prestop] SIGTERM to raylm driver(s) {pids or 'none'}; waiting up to {timeout:.0f} s", flush=True)
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [p for p in pids if alive(p)]
    if left:  # Kubernetes sends SIGKILL at the end of the grace period anyway
        print(f"[prestop] still running after {timeout:.0f} s: {left}", file=sys.stderr, flush=True)
    return len(pids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The pod's grace period bounds the hook; the default leaves render's 300 s a margin.
    parser.add_argument("--timeout", type=float, default=290.0, help="seconds to wait for the drivers to exit")
    # A pod stops every driver in it; a test on a shared machine only its own.
    parser.add_argument("--under", type=int, metavar="PID", help="only drivers descending from PID")
    args = parser.parse_args(argv)
    stop_drivers(args.timeout, args.under)
    return 0


if __name__ == "__main__":
    sys.exit(main())
