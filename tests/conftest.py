"""Shared fixtures. One local Ray instance serves the whole test run: starting Ray costs
5-10 s on 2 cores, so a per-test instance would dominate the suite."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]

# Fake credentials for moto's S3 server (it takes any). Set before the session's one Ray instance
# starts, whose workers read them from their environment as pods read cluster.secret's; the
# endpoint travels inside the pickled pyarrow FileSystem. Nothing here ever reaches AWS.
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
for _key, _value in S3_KEYS.items():
    os.environ.setdefault(_key, _value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 endpoint on 127.0.0.1: moto's server mode, for the whole session."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto's S3 server did not start on 127.0.0.1:{port}") from None
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from raylm.pipelines.runtime import start_ray

    resources = start_ray()  # the same embedded default the CLI uses
    yield resources
    ray.shutdown()


def tiny_overrides(tmp: Path) -> list[str]:
    """A config small enough for a test (2 layers, 64 wide, 64-token windows, ~60 steps
    reach 0.85 bits/byte on the grammar); outputs and the MLflow store inside tmp."""
    return [
        f"run.output_dir={tmp / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        "data.grammar.num_docs=4000",
        "model.n_layer=2",
        "model.n_embd=64",
        "model.block_size=64",
        "data.seq_len=64",
        "train.batch_size=16",
        "train.micro_batch_size=8",
        "train.lr=1e-2",  # a 2-layer, 64-wide model tolerates it and learns in few steps
        "train.warmup_steps=5",
        "train.log_interval=5",
    ]
