"""What a user reads in `ray job logs` after a run where nothing went wrong: no ERROR or WARNING
line, from raylm, Ray (Python loggers or the C++ core worker) or MLflow alike. Known-harmless
lines are dropped at their source: Ray's token-authentication notice by a logging filter
(pipelines/runtime.py), Ray Data's actor-pool restart ERROR on the way out of the process
(raylm/cli/quiet.py)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

from raylm.pipelines.runtime import (
    NO_CPU_WARNING,
    TOKEN_AUTH_NOTICE,
    not_no_cpu_warning,
    not_token_auth_notice,
)
from tests.conftest import REPO, tiny_overrides

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# What marks a line as a problem: a logging level (Python's and MLflow's "WARNING mlflow...",
# Ray's "2026-01-01 00:00:00,000\tWARNING file.py:1 --"), the C++ core worker's "[... E pid tid]"
# (W, E or F), or a Python warning ("UserWarning: ...").
ALARM = re.compile(r"\b(WARNING|ERROR|CRITICAL|FATAL)\b|\[\d{4}-\d\d-\d\d [\d:,.]+ [WEF] \d+ \d+\]|\b[A-Z]\w*Warning: ")

CORE_WORKER_LINE = (
    "[2026-12-04 05:26:18,598 E 8043 8043] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(EncodeAndPack))' and ID: '0e2dd3b939b36555168afbf901000000' has constructor arguments "
    "in the object store and max_restarts > 0. If the arguments in the object store go out of scope or are lost, "
    "the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details."
)


def alarms(text: str) -> list[str]:
    return [line for line in ANSI.sub("", text).splitlines() if ALARM.search(line)]


def test_a_normal_run_logs_no_error_or_warning(tmp_path):
    """`raylm run` as `ray job submit` runs it: its own process, stdout and stderr in one log."""
    overrides = [*tiny_overrides(tmp_path), "data.grammar.num_docs=2000", "train.max_steps=5", "train.warmup_steps=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    proc = subprocess.run(
        [sys.executable, "-m", "raylm", "run", str(REPO / "configs" / "quickstart.yaml")]
        + [x for o in overrides for x in ("--set", o)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "raylm run 'quickstart' finished" in proc.stdout
    assert alarms(proc.stdout) == []


def test_only_the_known_harmless_core_worker_line_is_dropped():
    """Other lines keep their order, a line the core worker writes for another actor stays, and
    a partial line or what the process wrote just before it aborted still comes out."""
    code = f"""
import os, sys, time
from raylm.cli.quiet import drop_harmless_stderr
drop_harmless_stderr()
harmless = {CORE_WORKER_LINE!r}
os.write(2, ("before\\n" + harmless + "\\nafter\\n").encode())
os.write(2, (harmless.replace("MapWorker(MapBatches(EncodeAndPack))", "StopRequest") + "\\n").encode())
print("from python", file=sys.stderr, flush=True)
os.write(2, b"partial")
time.sleep(0.5)
print("stdout", flush=True)
os.write(2, b" line\\nlast words")
os.abort()
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60
    )
    assert proc.returncode < 0  # SIGABRT
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["before", "after"]
    assert "'StopRequest'" in lines[2] and lines[3:] == ["from python", "partialstdout", " line", "last words"]


def test_the_token_auth_notice_is_dropped_but_not_the_warning_that_auth_is_off():
    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("ray", logging.WARNING, __file__, 1, message, None, None)

    assert not not_token_auth_notice(record(f"{TOKEN_AUTH_NOTICE} Set RAY_AUTH_MODE=disabled to opt out."))
    assert not_token_auth_notice(record("Token authentication is disabled for this Ray cluster. Anyone with ..."))


def test_ray_data_s_no_cpu_warning_is_dropped_but_not_its_other_warnings():
    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("ray.data.dataset", logging.WARNING, __file__, 1, message, None, None)

    assert not not_no_cpu_warning(record(f"{NO_CPU_WARNING} The Dataset job will hang unless more CPUs are freed."))
    assert not_no_cpu_warning(record("Truncating long operator name to 100 characters."))
