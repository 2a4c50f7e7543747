"""What a finished training run leaves in MLflow for review beyond its metrics: the model in
Hugging Face format under model/, optionally registered, and the loss curve under plots/."""

from __future__ import annotations

import tempfile
from pathlib import Path

from raylm.config import TrackingSection
from raylm.fmt import figure, save_figure
from raylm.models.hf import NotConvertible, export_hf
from raylm.pipelines.track.tracking import Tracker
from raylm.storage import Location, locate

CURVES = ("train_loss", "val_loss")


def log_model(tracker: Tracker, model_dir: Path | Location, tracking: TrackingSection) -> None:
    """model/: the trained weights as a LlamaForCausalLM directory with its tokenizer, which
    `transformers` loads straight from the artifact store; registered when the config names a
    registered model. A model export refuses (qk_norm) is logged in raylm's own format."""
    if not tracking.log_model:
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            out = export_hf(model_dir, Path(tmp) / "model")
        except NotConvertible as err:
            if locate(model_dir).local is None:  # raylm's format is the checkpoint itself, on object storage
                print(f"[mlflow] model/ not logged: {err}; the model is the checkpoint {model_dir}", flush=True)
                return
            print(f"[mlflow] model/ holds raylm's format, not Hugging Face's: {err}", flush=True)
            out = locate(model_dir).local
        tracker.log_artifact(out, "model")
    if tracking.register_model:
        version = tracker.register_model(tracking.register_model)
        if version is not None:  # None: kept for later, in an outage of the server
            print(f"[mlflow] registered model {tracking.register_model!r} version {version}", flush=True)


def log_loss_curve(tracker: Tracker) -> None:
    """plots/loss.png: train and validation loss against step, read back from the run; none for
    a launch that trained nothing (a relaunch whose budget was already spent). In an outage of
    the server, drawn when what the run kept is delivered (the curve is read back from the run)."""
    curves = tracker.attempt({"kind": "loss_curve"}, lambda: read_curves(tracker))
    if not curves or not any(curves.values()):
        return
    fig, ax = figure((7, 4))
    for key, history in curves.items():
        if history:
            steps, values = zip(*history)
            ax.plot(steps, values, label=key, marker="o" if key == "val_loss" else None, markersize=3)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "loss.png"
        save_figure(fig, path, bbox_inches="tight")
        tracker.log_artifact(path, "plots")


def read_curves(tracker: Tracker) -> dict[str, list[tuple[int, float]]]:
    return {
        key: sorted((m.step, m.value) for m in tracker.client.get_metric_history(tracker.run_id, key)) for key in CURVES
    }
