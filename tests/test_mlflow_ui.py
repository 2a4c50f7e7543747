"""A raylm run as users review it in the MLflow UI: scripts/mlflow_screenshots.py starts a real
`mlflow server` on a sqlite store, opens the run in headless Chromium and saves screenshots of
its overview and of a metric's chart; the page's text and the PNGs are checked (~20 s)."""

import math
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from PIL import Image, ImageStat

from tests.mlflow_server import load_script

RUN = "pretrain-0.1m-grammar-3f9c"
INSTALL = "apt-get install -y --no-install-recommends chromium chromium-driver"


def log_run(uri: str) -> dict[str, float]:
    """A finished pretraining run with tags, params and 30 steps of falling losses; returns its
    last values, rounded so that the UI shows them as Python writes them."""
    client = MlflowClient(uri)
    experiment = client.create_experiment("raylm")
    run_id = client.create_run(
        experiment, run_name=RUN, tags={"raylm.stage": "pretrain", "raylm.run_name": "grammar"}
    ).info.run_id
    for key, value in {"model.n_layer": 2, "model.n_embd": 64, "train.lr": 0.01}.items():
        client.log_param(run_id, key, value)
    curves = {"train_loss": lambda s: 0.5 + 4.0 * math.exp(-s / 8), "val_loss": lambda s: 0.6 + 4.2 * math.exp(-s / 8)}
    now_ms = int(time.time() * 1000)
    metrics = [
        Metric(key, round(curve(step), 4), now_ms + step, step)
        for key, curve in curves.items()
        for step in range(1, 31)
    ]
    client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id, "FINISHED")
    return {key: round(curve(30), 4) for key, curve in curves.items()}


def assert_real_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000, f"{path}: {path.stat().st_size} bytes, too small for a rendered page"
    with Image.open(path) as image:
        assert image.width == 1400
        spread = ImageStat.Stat(image.convert("L")).stddev[0]
    assert spread > 10, f"{path} is nearly uniform (grey-level std {spread:.1f}): a blank page?"
    print(f"{path.name}: {image.width}x{image.height}, {path.stat().st_size} bytes, grey-level std {spread:.1f}")


@pytest.mark.skipif(
    not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()),
    reason=f"needs Debian's Chromium and its driver: {INSTALL}",
)
def test_run_page_shows_the_run_and_its_loss_chart(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    last = log_run(uri)
    shots = load_script().screenshot_run(tmp_path / "shots", backend_store_uri=uri, run_name=RUN, metric="train_loss")

    assert shots.metric.name == "metric-train_loss.png"
    for png in (shots.overview, shots.metric):
        assert_real_png(png)
    for shown in (
        RUN,
        "Finished",
        "train.lr",
        "raylm.stage",
        "train_loss",
        str(last["train_loss"]),
        "val_loss",
        str(last["val_loss"]),
    ):
        assert shown in shots.overview_text, f"{shown!r} not on the overview page:\n{shots.overview_text}"
    print(
        f"overview at {shots.url} shows {RUN}, its status, a param, a tag, "
        f"train_loss {last['train_loss']} and val_loss {last['val_loss']}"
    )
