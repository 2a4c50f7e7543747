"""`raylm submit`: run a command on a Ray cluster as a Ray job, through the job server that the
head node's dashboard serves (port 8265 by default). The job gets a copy of the working
directory, the environment variables given here and the submitter's MLflow URI; its logs stream
to stdout and its exit status becomes this command's.

Token auth (Ray 2.60): `JobSubmissionClient` adds `Authorization: Bearer <token>` to every
request, the log stream's websocket included, when RAY_AUTH_MODE=token. It reads the token from
$RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. An explicit address
never turns token mode on by itself (ray.init's rule too), so against a token cluster without
RAY_AUTH_MODE=token the server answers 401, and `ClusterAuthError` says what to set.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from raylm.cluster.manifests import JOB_STOP_GRACE_S
from raylm.errors import Interrupted, RaylmError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Ray itself leaves out .git, .venv, venv, __pycache__ and whatever .gitignore/.rayignore list.
# These are named again so that a folder without our .gitignore (or a submitter with
# RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) still ships no run outputs: the zip must stay under
# Ray's 512 MiB package limit, and a 43 MB mlruns/ is common. Anchored at the working dir.
EXCLUDES = [
    "/.venv",
    "/venv",
    "/runs",
    "/mlruns",
    "/mlartifacts",
    "/mlflow.db",
    "/.pytest_cache",
    "*.egg-info",
    "__pycache__",
    "/.git",
]
# A stopped job got SIGTERM from `ray job stop` (then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S),
# so it exits like a raylm run stopped by SIGTERM: 143.
STOPPED_EXIT = Interrupted.exit_code
# After the log stream ends the status can lag by a poll of the job manager (about 1 s).
STATUS_WAIT_S = 30.0
# `stop` waits this long for the job to end. Ray's own SIGKILL follows its SIGTERM after
# RAY_JOB_STOP_WAIT_TIME_S, 3 s by default; a cluster that leaves time for a final checkpoint
# may set more.
STOP_WAIT_S = 60.0


class ClusterUnreachable(RaylmError):
    """No Ray job server answers at the address."""


class ClusterAuthError(RaylmError):
    """The job server refused the request: a missing or wrong token."""


class JobServerError(RaylmError):
    """The job server answered with an error (an unknown job id, a submission id in use...)."""


def resolve_address(address: str | None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS (Ray's own order), else local."""
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def job_env(pairs: list[str], mlflow_uri: str | None) -> dict[str, str]:
    """The job's environment variables from KEY=VALUE pairs, plus MLFLOW_TRACKING_URI from
    --mlflow-uri or this shell (the job's own tracking.tracking_uri, if set, still wins)."""
    env = {}
    for i, pair in enumerate(pairs, 1):
        key, sep, value = pair.partition("=")
        if not sep or not key or not key.replace("_", "a").isalnum():
            shown = repr(key) if sep else f"number {i}"  # without "=" it may be a value: don't echo it
            raise RaylmError(f"--env {shown}: expected KEY=VALUE with a variable name as KEY")
        env[key] = value
    uri = mlflow_uri or env.get("MLFLOW_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def runtime_env(working_dir: str | Path, env: dict[str, str]) -> dict:
    path = Path(working_dir).resolve()
    if not path.is_dir():
        raise RaylmError(f"--working-dir {working_dir}: not a directory")
    # RAY_JOB_STOP_WAIT_TIME_S: `raylm submit --stop` (or `ray job stop`) lets the job checkpoint
    # and end its MLflow run KILLED before the SIGKILL; see JOB_STOP_GRACE_S.
    return {
        "working_dir": str(path),
        "excludes": EXCLUDES,
        "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(JOB_STOP_GRACE_S), **env},
    }


@contextmanager
def job_server_errors(address: str):
    """Ray's client raises builtin ConnectionError, requests' ConnectionError, AuthenticationError
    or RuntimeError (any other HTTP error); each becomes one line for the user."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as err:
        raise ClusterAuthError(
            f"{address} refused the request ({str(err).splitlines()[0]}): set RAY_AUTH_MODE=token "
            "and the cluster's token in $RAY_AUTH_TOKEN, a file named by $RAY_AUTH_TOKEN_PATH, "
            "or ~/.ray/auth_token"
        ) from None
    except (ConnectionError, requests.exceptions.ConnectionError):
        raise ClusterUnreachable(
            f"no Ray job server answers at {address}: start a head with "
            "`ray start --head` (ray[default] serves jobs on the dashboard port, 8265), "
            "or pass --address http://HEAD:8265"
        ) from None
    except RuntimeError as err:
        raise JobServerError(f"{address}: {_last_line(str(err))}") from None


def _last_line(text: str) -> str:
    """A server-side error arrives as its whole traceback; the exception's line says it."""
    lines = [line.strip() for line in text.splitlines() if line.strip(" .")]
    return lines[-1] if len(lines) > 1 else text.strip()


def connect(address: str | None):
    """A JobSubmissionClient for the resolved address. Ray's client lets $RAY_ADDRESS and
    $RAY_API_SERVER_ADDRESS override its argument; an explicit --address must win, so they are
    hidden while it connects."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        with job_server_errors(url):
            return JobSubmissionClient(url), url
    finally:
        os.environ.update(hidden)


def submit(
    address: str | None,
    entrypoint: list[str],
    working_dir: str | Path = ".",
    env: dict[str, str] | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    submission_id: str | None = None,
    wait: bool = True,
) -> int:
    """Submit `entrypoint` as a Ray job; with wait, stream its logs and return its exit status."""
    env = env or {}
    client, url = connect(address)
    renv = runtime_env(working_dir, env)
    with job_server_errors(url):
        job_id = client.submit_job(
            entrypoint=shlex.join(entrypoint),
            runtime_env=renv,
            submission_id=submission_id,
            entrypoint_num_cpus=num_cpus,
            entrypoint_num_gpus=num_gpus,
        )
    # Names only: values (a tracking URI with a password, a token) must not reach logs.
    names = ", ".join(sorted(env)) or "none"
    print(f"raylm: submitted job {job_id} to {url} (working dir {renv['working_dir']}; env vars: {names})", flush=True)
    if not wait:
        print(_next_steps(url, job_id), flush=True)
        return 0
    return follow(address, job_id, client)


def follow(address: str | None, job_id: str, client=None) -> int:
    """Stream a job's logs until it ends; its exit status. Ctrl-C leaves the job running."""
    if client is None:
        client, url = connect(address)
    else:
        url = resolve_address(address)
    try:
        with job_server_errors(url):
            _stream_logs(client, url, job_id)
    except KeyboardInterrupt:
        print(
            f"\nraylm: stopped following; job {job_id} goes on running on the cluster.\n{_next_steps(url, job_id)}",
            file=sys.stderr,
            flush=True,
        )
        return 130  # 128 + SIGINT, as the shell reports Ctrl-C
    with job_server_errors(url):
        info = _wait_terminal(client, job_id, STATUS_WAIT_S)
    return _report(job_id, info)


def stop(address: str | None, job_id: str) -> int:
    """Ask the job server to stop a job (SIGTERM to its driver: raylm checkpoints and exits) and
    wait for it to end. 0 once it has ended, whatever its final status."""
    client, url = connect(address)
    with job_server_errors(url):
        was_running = client.stop_job(job_id)
        info = _wait_terminal(client, job_id, STOP_WAIT_S)
    if not info.status.is_terminal():
        print(
            f"raylm: asked job {job_id} to stop; after {STOP_WAIT_S:.0f} s it is still {info.status} (a final "
            f"checkpoint may be on its way): raylm submit --address {url} --follow {job_id} shows the end",
            flush=True,
        )
        return 1
    note = "" if was_running else " (it had already ended)"
    print(f"raylm: job {job_id} is {info.status}{note}", flush=True)
    return 0


def _stream_logs(client, url: str, job_id: str) -> None:
    try:
        asyncio.run(_print_logs(client, job_id))
    except RuntimeError as err:  # the websocket closed abnormally: the head restarted, the network broke
        raise JobServerError(
            f"lost the log stream of job {job_id} ({_last_line(str(err))}); it may still be "
            f"running: raylm submit --address {url} --follow {job_id}"
        ) from None


async def _print_logs(client, job_id: str) -> None:
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed ..."
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _wait_terminal(client, job_id: str, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    info = client.get_job_info(job_id)
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    return info


def _report(job_id: str, info) -> int:
    code = exit_status(info)
    if info.status == "SUCCEEDED":
        print(f"raylm: job {job_id} succeeded", flush=True)
    else:
        message = f": {info.message.strip()}" if info.message else ""
        print(f"raylm: job {job_id} {info.status} (exit status {code}){message}", file=sys.stderr, flush=True)
    return code


def exit_status(info) -> int:
    """0 for SUCCEEDED, 143 for STOPPED; for FAILED the driver's own exit code when it has one
    (raylm's 2 for a user error, 1 for a failed run), else 1 (e.g. the runtime env failed)."""
    if info.status == "SUCCEEDED":
        return 0
    if info.status == "STOPPED":
        return STOPPED_EXIT
    if not info.status.is_terminal():
        return 1
    code = info.driver_exit_code
    if code is not None and code < 0:
        return 128 - code  # killed by signal -code, as a shell would report it
    return code if code and code < 256 else 1


def _next_steps(url: str, job_id: str) -> str:
    return (
        f"  follow: raylm submit --address {url} --follow {job_id}\n"
        f"  stop:   raylm submit --address {url} --stop {job_id}"
    )
