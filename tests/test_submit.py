"""Job submission against a real Ray head started here (`ray start --head` on 127.0.0.1, token
auth on, its own ports, temp dir and token): tiny `raylm run` jobs submitted with `ray job submit`
and with `raylm submit` succeed and leave a FINISHED MLflow run, a failing job makes both exit
non-zero, and `--no-wait` returns an id that `--stop` stops. No mocks: every job is a Ray job."""

from __future__ import annotations

import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from raylm.cli import main
from tests.conftest import REPO, tiny_overrides

BIN = Path(sys.executable).parent  # the venv's bin: the head's PATH, so jobs run this venv's raylm
HEAD_START_S = 90  # `ray start --head` answered in about 10 s on 2 cores; a loaded CI box is slower
JOB_TIMEOUT_S = 240  # a tiny `raylm run` job took 60-110 s on a busy 2-core machine
# `ray start --block` stopped in about 6 s once the drain is off (below); then SIGKILL what is left.
STOP_GRACE_S = 30
# Workers take ports from the head's range. The default (10002-19999) is shared with any other
# Ray on the machine (the suite's own instance, a colleague's head), so this head gets a block
# of its own from 20000-30000, below Linux's ephemeral range (32768+).
WORKER_PORTS = 200


@dataclass
class Head:
    url: str  # the job server (dashboard) address
    env: dict  # a client environment that authenticates against this head
    store: Path  # runs and the MLflow database shared by the raylm jobs


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_block(size: int) -> int:
    for _ in range(50):
        start = random.randrange(20000, 30000 - size)
        if all(port_is_free(p) for p in range(start, start + size)):
            return start
    raise RuntimeError(f"no {size} free consecutive ports in 20000-30000")


def clean_env(**extra: str) -> dict:
    """This process's environment without what points at another Ray or MLflow (the suite's
    in-process Ray may have set RAY_ADDRESS or RAY_AUTH_MODE), with the venv first on PATH."""
    drop = (
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "MLFLOW_TRACKING_URI",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def head_command(temp_dir: Path) -> tuple[list[str], int]:
    gcs, dash, agent_http, agent_grpc, env_agent, metrics, client, node_mgr, obj_mgr = free_ports(9)
    first = free_port_block(WORKER_PORTS)
    # Ray maps a loopback --node-ip-address to the machine's IP (services.resolve_ip_for_localhost)
    # and its GCS listens on every interface; the job server (dashboard) stays on 127.0.0.1.
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--include-dashboard",
        "true",
        "--dashboard-agent-listen-port",
        str(agent_http),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(env_agent),
        "--metrics-export-port",
        str(metrics),
        "--ray-client-server-port",
        str(client),
        "--node-manager-port",
        str(node_mgr),
        "--object-manager-port",
        str(obj_mgr),
        "--min-worker-port",
        str(first),
        "--max-worker-port",
        str(first + WORKER_PORTS - 1),
        "--num-cpus",
        "2",
        "--num-gpus",
        "0",
        "--object-store-memory",
        str(500 * 1024**2),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    return cmd, dash


def wait_for_job_server(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + HEAD_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token): up
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"no job server at {url} after {HEAD_START_S} s:\n{log.read_text()[-3000:]}")


def stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block`, which stops its raylet, GCS and dashboard in order (a
    SIGTERM to the whole group took 33 s: the raylet kept retrying the GCS that died first).
    Then SIGKILL whatever is left of the session started for it: workers have process groups
    of their own. Never `ray stop`: it kills every Ray on the machine."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.getsid(int(entry)) == sid:
                pids.append(int(entry))
        except (ProcessLookupError, PermissionError):
            pass
    return pids


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    # A short temp dir: Ray's unix sockets live under it, and their paths must stay under 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rlsub", dir="/tmp"))
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))  # this head's own token, not ~/.ray/auth_token
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    cmd, dash = head_command(temp_dir)
    url = f"http://127.0.0.1:{dash}"
    # One node has nothing to drain: Train's preemption watcher would only poll the GCS every 5 s,
    # and on SIGTERM the head would wait out its 30 s drain (Ray Data's detached actors keep it
    # busy) before stopping. Ray Train's placement-group cleaner finds the state API by looking
    # for Ray instances on the machine and fails when there are several (this suite's own, a
    # colleague's): name it.
    head_env = clean_env(
        **auth,
        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        RAY_API_SERVER_ADDRESS=url,
    )
    log = temp_dir / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=head_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_job_server(url, proc, log)
        yield Head(url, clean_env(**auth), tmp_path_factory.mktemp("store"))
    finally:
        stop_head(proc)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def run(cmd: list[str], env: dict, timeout: float = JOB_TIMEOUT_S, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def job_overrides(store: Path, name: str) -> list[str]:
    """tiny_overrides cut to 10 steps on 1,000 documents and 1 worker: a job of 60-100 s on 2
    cores, most of it Ray starting Data and Train workers."""
    cut = [
        "train.max_steps=10",
        "train.eval_interval=10",
        "train.checkpoint_interval=10",
        "train.eval_windows=4",
        "data.grammar.num_docs=1000",
        "scaling.num_workers=1",
        "eval.max_tokens=512",  # 8 windows of 64
        "eval.sample_tokens=0",
        f"run.name={name}",
    ]
    tiny = [o for o in tiny_overrides(store) if not o.startswith("tracking.")]
    return [a for o in tiny + cut for a in ("--set", o)]


def mlflow_uri(store: Path) -> str:
    return f"sqlite:///{store / 'mlflow.db'}"  # store is absolute: sqlite:////tmp/...


def finished_runs(store: Path, name: str) -> list:
    """The MLflow runs of run.name `name`, newest first."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri(store))
    experiment = client.get_experiment_by_name("raylm")
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`raylm.run_name` = '{name}'",
        order_by=["attributes.start_time DESC"],
    )


def check_run(run_) -> None:
    assert run_.info.status == "FINISHED"
    assert run_.data.metrics["final_val_loss"] > 0 and run_.data.params  # evaluated, config logged


def test_ray_job_submit_runs_raylm(head):
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head.url,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        f'{{"env_vars": {{"MLFLOW_TRACKING_URI": "{mlflow_uri(head.store)}"}}}}',
        "--",
        "raylm",
        "run",
        *job_overrides(head.store, "submitted"),
    ]
    proc = run(cmd, head.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "raylm run 'submitted' finished" in proc.stdout
    (first,) = finished_runs(head.store, "submitted")
    check_run(first)


def test_raylm_submit_of_the_same_run_resumes_it(head):
    """The same command again, through raylm submit: a resubmitted job (a RayJob's retry) finds
    the run's checkpoints on the shared store, trains nothing more and evaluates again."""
    cmd = [
        str(BIN / "raylm"),
        "submit",
        "--address",
        head.url,
        "--working-dir",
        str(REPO),
        "--mlflow-uri",
        mlflow_uri(head.store),
        "--env",
        "RAYLM_TEST_SECRET=not-for-logs",
        "--",
        "raylm",
        "run",
        *job_overrides(head.store, "submitted"),
    ]
    proc = run(cmd, head.env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "env vars: MLFLOW_TRACKING_URI, RAYLM_TEST_SECRET" in out and "not-for-logs" not in out
    assert "resumed from" in out and "at step 10" in out, out[-6000:]
    assert "raylm run 'submitted' finished" in out and "succeeded" in out
    second, first = finished_runs(head.store, "submitted")
    check_run(second)
    assert second.data.metrics["final_val_loss"] == first.data.metrics["final_val_loss"]  # the same weights


def test_job_sees_working_dir_without_outputs_and_env(head, tmp_path):
    for f in [
        "train.py",
        "runs/ckpt/w.bin",
        "mlruns/0/meta.yaml",
        "mlflow.db",
        ".venv/bin/python",
        "sub/runs/kept.txt",
    ]:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    show = (
        "import os; print(sorted(os.path.join(d, f) for d, _, fs in os.walk('.') for f in fs)); "
        "print(os.environ['MARK'])"
    )
    proc = run(
        [
            str(BIN / "raylm"),
            "submit",
            "--address",
            head.url,
            "--working-dir",
            str(tmp_path),
            "--env",
            "MARK=m-42",
            "--",
            "python",
            "-c",
            show,
        ],
        head.env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "['./sub/runs/kept.txt', './train.py']" in proc.stdout and "m-42" in proc.stdout


def test_failed_job_fails_both_commands(head, tmp_path):
    fail = ["python", "-c", "import sys; print('failing on purpose'); sys.exit(3)"]
    # Both at once: each job is about 10 s of waiting for its supervisor and runtime env.
    ray_cli = start([str(BIN / "ray"), "job", "submit", "--address", head.url, "--", *fail], head.env)
    ours = start(
        [str(BIN / "raylm"), "submit", "--address", head.url, "--working-dir", str(tmp_path), "--", *fail], head.env
    )
    ray_out, _ = ray_cli.communicate(timeout=90)
    our_out, our_err = ours.communicate(timeout=90)
    assert ray_cli.returncode == 1 and "failing on purpose" in ray_out, ray_out
    assert ours.returncode == 3, our_out + our_err  # the driver's own exit status
    assert "failing on purpose" in our_out and "FAILED (exit status 3)" in our_err


# A job that, like raylm on SIGTERM, needs a few seconds to wind down (a checkpoint): 5 s, past
# the 3 s after which Ray's job supervisor would SIGKILL it by default.
GRACEFUL = """
import pathlib, signal, sys, time
def stop(signum, frame):
    time.sleep(5)
    pathlib.Path(sys.argv[1]).write_text("stopped cleanly")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(600)
"""


def test_no_wait_returns_an_id_that_stop_stops_after_the_job_winds_down(head, tmp_path):
    base = [str(BIN / "raylm"), "submit", "--address", head.url]
    marker = tmp_path / "marker"
    (tmp_path / "graceful.py").write_text(GRACEFUL)
    t0 = time.monotonic()
    sub = run(
        [*base, "--working-dir", str(tmp_path), "--no-wait", "--", "python", "graceful.py", str(marker)],
        head.env,
        timeout=60,
    )
    assert sub.returncode == 0 and time.monotonic() - t0 < 30, sub.stdout + sub.stderr
    job_id = re.search(r"submitted job (\S+)", sub.stdout).group(1)
    assert f"--stop {job_id}" in sub.stdout and f"--follow {job_id}" in sub.stdout
    deadline = time.monotonic() + 60
    while (
        "ready"
        not in run([str(BIN / "ray"), "job", "logs", "--address", head.url, job_id], head.env, timeout=30).stdout
    ):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(1)
    stop = run([*base, "--stop", job_id], head.env, timeout=90)
    assert stop.returncode == 0 and f"job {job_id} is STOPPED" in stop.stdout, stop.stdout + stop.stderr
    follow = run([*base, "--follow", job_id], head.env, timeout=60)
    assert follow.returncode == 143, follow.stdout + follow.stderr  # stopped: 128 + SIGTERM
    deadline = time.monotonic() + 30  # the supervisor reports STOPPED as soon as it has signalled
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert marker.read_text() == "stopped cleanly", "SIGKILLed before its 5 s wind-down"
    print("[test] `raylm submit --stop`: the job got SIGTERM and finished its 5 s wind-down before any SIGKILL")


def test_missing_token_is_a_clear_error(head, tmp_path):
    env = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")}
    proc = run(
        [str(BIN / "raylm"), "submit", "--address", head.url, "--working-dir", str(tmp_path), "--", "true"],
        env,
        timeout=60,
    )
    assert proc.returncode == 2 and "RAY_AUTH_MODE=token" in proc.stderr, proc.stdout + proc.stderr


def test_unreachable_address_and_bad_config_fail_before_any_upload(capsys):
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    assert main(["submit", "--address", dead, "--", "raylm", "run", "--set", "train.bogus=1"]) == 2
    assert "unknown key train.bogus" in capsys.readouterr().err  # the config, checked here before any upload
    assert main(["submit", "--address", dead, "--", "raylm", "run"]) == 2
    assert f"no Ray job server answers at {dead}" in capsys.readouterr().err


def test_checkout_on_pythonpath_shadows_an_installed_raylm(tmp_path):
    """What a job with the repository as working dir sees: the copy first on PYTHONPATH, before
    an installed (not editable) raylm. The subpackages import from the copy, through the
    symlinks in raylm/, with no import hook at all."""
    drop_editable = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in str(f)]; "
    code = drop_editable + "import raylm.pipelines.track.tracking as t, raylm.cluster.submit; print(t.__file__)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve() == REPO / "pipelines" / "track" / "tracking.py"


def test_exit_status_follows_the_driver():
    from ray.job_submission import JobInfo, JobStatus

    from raylm.cluster.submit import exit_status

    def status(state, code=None):
        return exit_status(JobInfo(status=state, entrypoint="raylm run", driver_exit_code=code))

    assert status(JobStatus.SUCCEEDED, 0) == 0 and status(JobStatus.STOPPED) == 143
    assert status(JobStatus.FAILED, 2) == 2 and status(JobStatus.FAILED, 1) == 1
    assert status(JobStatus.FAILED, -9) == 137  # SIGKILL, as a shell reports it
    assert status(JobStatus.FAILED) == 1  # no driver ran, e.g. the runtime env failed


def test_job_env_takes_pairs_and_the_mlflow_uri(monkeypatch):
    from raylm.cluster.submit import job_env
    from raylm.errors import RaylmError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-shell:5000")
    assert job_env(["A=1", "B=x=y"], None) == {"A": "1", "B": "x=y", "MLFLOW_TRACKING_URI": "http://from-shell:5000"}
    assert job_env([], "sqlite:////abs/m.db") == {"MLFLOW_TRACKING_URI": "sqlite:////abs/m.db"}
    for bad in ["=s3cret", "s3cret", "A B=s3cret"]:
        with pytest.raises(RaylmError, match="KEY=VALUE") as err:
            job_env([bad], None)
        assert "s3cret" not in str(err.value)
