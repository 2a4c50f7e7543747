"""Every benchmark's smoke mode, run as a user runs the script, so that a broken benchmark fails
here rather than when someone next needs its figures. Each script starts its own local Ray, as
it would for a user (~10 s: the session's instance listens on an address only this process
maps); their figures are not checked (tiny sizes, one round), only that they run to their
summary line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

# script -> a line its summary prints. benchmarks/ddp_baseline.py is not here: it is the
# torchrun side of train_overhead.py, which runs it.
SMOKE = {
    "checkpoint_memory.py": "sharded / gather:",
    "generate_kv_cache.py": "same greedy tokens: True",
    "prepare_throughput.py": "raylm prepare, defaults",
    "prepare_scale.py": "prepare scale x",
    "train_overhead.py": "median ratio:",
    "learn_shakespeare.py": "nats/char after",
    "gpu_mfu.py": "eager",
    "gpu_check.py": "all checks passed",  # and its table says Ray and MLflow were never imported
    "tune_overhead.py": "overhead = sweep wall",
    "tracking_overhead.py": "median ratio",
    "train_state_ray.py": "resume / save, highest rank:",
}
RUN_BY_ANOTHER = {"ddp_baseline.py": "train_overhead.py"}


def test_every_benchmark_has_a_smoke_run_here():
    scripts = {p.name for p in (REPO / "benchmarks").glob("*.py")}
    assert scripts == set(SMOKE) | set(RUN_BY_ANOTHER)
    assert all("--smoke" in (REPO / "benchmarks" / name).read_text() for name in SMOKE)


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_smoke_mode_runs_to_its_summary(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    args = [sys.executable, str(REPO / "benchmarks" / script), "--smoke"]
    if script not in ("generate_kv_cache.py", "prepare_throughput.py", "gpu_check.py"):
        args += ["--work", str(tmp_path)]
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{script} --smoke exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert SMOKE[script] in out.stdout, out.stdout[-3000:]
