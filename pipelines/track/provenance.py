"""What an MLflow run is, in words a reviewer can scan: its name, and the tags that say which
code, config, libraries and data made it. No Ray and no torch import: the CLI names runs
before any worker starts."""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from raylm.config import RaylmConfig, section_fingerprint
from raylm.models.config import param_counts, planned_model

REPO = Path(__file__).resolve().parents[2]  # pipelines/track/provenance.py -> the checkout


def run_title(cfg: RaylmConfig, stage: str) -> str:
    """`pretrain-124m-tinystories-3f9c`: the stage, the model's size, the data, and 4 hex of
    the config's hash, so that two launches of one config share a name and two configs do not."""
    parts = [stage]
    if stage == "finetune":  # the base model's size is known only once it is loaded
        parts += ["lora", cfg.finetune.mode] if cfg.finetune.lora.enabled else [cfg.finetune.mode]
    elif stage != "prepare":
        parts.append(size_label(param_counts(planned_model(cfg.model, cfg.tokenizer.vocab_size))["total"]))
    parts += [data_label(cfg, stage), section_fingerprint(cfg)[:4]]
    return "-".join(parts)


def size_label(params: int) -> str:
    """124m, 1.3b, 7b, 210k: three significant digits at most, the way model sizes are said."""
    for unit, scale in (("b", 1e9), ("m", 1e6), ("k", 1e3)):
        if params >= scale:
            return f"{params / scale:.3g}{unit}"
    return str(params)


def data_label(cfg: RaylmConfig, stage: str) -> str:
    """The sources' names joined by "+", or "grammar" for the built-in corpus; instruction
    fine-tuning names its instruction data instead."""
    if stage == "finetune" and cfg.finetune.mode == "sft":
        names = [s.name or Path(s.paths[0]).stem for s in cfg.finetune.sft.sources]
    else:
        names = [s.name or Path(s.paths[0].rstrip("/")).name.split(".")[0] for s in cfg.data.sources] or ["grammar"]
    label = "+".join(dict.fromkeys(names)) or "data"
    return re.sub(r"[^A-Za-z0-9_.+]+", "_", label)[:40]


def provenance_tags() -> dict[str, str]:
    """Which code and libraries ran, and which process drives the run (for finding runs whose
    driver died: pipelines/track/tracking.py)."""
    commit, dirty = git_state()
    tags = {f"raylm.{name}_version": package_version(name) for name in ("ray", "torch", "mlflow", "tokenizers")}
    tags |= {
        "raylm.python_version": platform.python_version(),
        "raylm.host": socket.gethostname(),
        "raylm.driver_pid": str(os.getpid()),
    }
    if commit:  # mlflow.source.git.commit is what the run page shows as "Source version"
        tags |= {"mlflow.source.git.commit": commit, "raylm.git_commit": commit, "raylm.git_dirty": str(dirty).lower()}
    return tags


def git_state() -> tuple[str | None, bool]:
    """The checkout's commit and whether it has uncommitted changes; in an image built without
    .git, $RAYLM_GIT_COMMIT (the Dockerfile's build argument)."""
    if os.environ.get("RAYLM_GIT_COMMIT"):
        return os.environ["RAYLM_GIT_COMMIT"], False
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, False
    if commit.returncode:
        return None, False
    return commit.stdout.strip(), bool(status.stdout.strip())


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
