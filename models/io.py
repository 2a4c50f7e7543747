"""A model directory: `model.safetensors` (weights) + `model.json` (ModelConfig).

Loading never unpickles: safetensors holds raw tensors only, the config is JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch

from .config import ModelConfig
from .gpt import GPT

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"


def save_model(model: GPT, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    # save_model (not save_file) drops the tied lm_head alias instead of refusing shared storage.
    safetensors.torch.save_model(model, str(directory / WEIGHTS_FILE))


def load_config(directory: str | Path) -> ModelConfig:
    return ModelConfig(**json.loads((Path(directory) / CONFIG_FILE).read_text()))


def load_model(directory: str | Path, device: str = "cpu") -> GPT:
    model = GPT(load_config(directory))
    safetensors.torch.load_model(model, str(Path(directory) / WEIGHTS_FILE), device=device)
    return model.to(device)
