"""Model family: plain single-device PyTorch. Never imports Ray.

`raylm.models.config` (ModelConfig, parameter and FLOP counts) does not import torch
either, so configs are checked and sized without it; the names below load torch on first use.
"""

from raylm.config import PRESETS
from raylm.models.config import ModelConfig, flops_per_token, param_counts

__all__ = ["GPT", "ModelConfig", "PRESETS", "flops_per_token", "load_model", "param_counts", "save_model"]


def __getattr__(name: str):
    if name == "GPT":
        from raylm.models.gpt import GPT

        return GPT
    if name in ("load_model", "save_model"):
        from raylm.models import io

        return getattr(io, name)
    raise AttributeError(f"module 'raylm.models' has no attribute {name!r}")
