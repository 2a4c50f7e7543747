"""Shared fixtures. One local Ray instance serves the whole test run: starting Ray costs
5-10 s on 2 cores, so a per-test instance would dominate the suite."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


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
