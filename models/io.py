"""A model directory: `model.safetensors` (weights) + `model.json` (ModelConfig).

Loading never unpickles: safetensors holds raw tensors only, the config is JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from .config import ModelConfig
from .gpt import GPT
from .lora import LoraConfig, apply_lora, merge_lora

WEIGHTS_FILE = "model.safetensors"
TIED_ALIAS = "tok_emb.weight"  # with tie_embeddings, the same tensor as lm_head.weight
CONFIG_FILE = "model.json"
LORA_FILE = "lora.json"  # present when the weights include LoRA adapters (models/lora.py)


def save_model(model: GPT, directory: str | Path) -> None:
    save_weights(model.config, model.state_dict(), directory)


def save_weights(config: ModelConfig, weights: dict[str, torch.Tensor], directory: str | Path,
                 lora: LoraConfig | None = None) -> None:
    """Write a model directory from a state dict (e.g. one gathered from FSDP shards)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if lora:
        (directory / LORA_FILE).write_text(json.dumps(lora.to_dict(), indent=2) + "\n")
    if config.tie_embeddings:  # one tensor under two names: safetensors stores it once, as the head
        weights = {k: v for k, v in weights.items() if k != TIED_ALIAS}
    safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / WEIGHTS_FILE))


def read_weights(directory: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every parameter by name, on the CPU, the tied alias included (what load_state_dict wants)."""
    weights = safetensors.torch.load_file(str(Path(directory) / WEIGHTS_FILE))
    if config.tie_embeddings:
        weights[TIED_ALIAS] = weights["lm_head.weight"]
    return weights


def load_config(directory: str | Path) -> ModelConfig:
    return ModelConfig(**json.loads((Path(directory) / CONFIG_FILE).read_text()))


def load_lora(directory: str | Path) -> LoraConfig | None:
    path = Path(directory) / LORA_FILE
    return LoraConfig(**json.loads(path.read_text())) if path.is_file() else None


def load_model(directory: str | Path, device: str = "cpu") -> GPT:
    """The model a directory holds, as a plain GPT: LoRA adapters, if any, merged in."""
    model, lora = GPT(load_config(directory)), load_lora(directory)
    if lora:
        apply_lora(model, lora)
    safetensors.torch.load_model(model, str(Path(directory) / WEIGHTS_FILE), device=device)
    return (merge_lora(model) if lora else model).to(device)
