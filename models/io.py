"""A model directory: `model.safetensors` (weights) + `model.json` (ModelConfig).

Loading never unpickles: safetensors holds raw tensors only, the config is JSON.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from raylm.errors import DataError  # a leaf module: no Ray, no torch
from raylm.models.config import ModelConfig
from raylm.models.gpt import GPT
from raylm.models.lora import LoraConfig, apply_lora, merge_lora

WEIGHTS_FILE = "model.safetensors"
TIED_ALIAS = "tok_emb.weight"  # with tie_embeddings, the same tensor as lm_head.weight
CONFIG_FILE = "model.json"
LORA_FILE = "lora.json"  # present when the weights include LoRA adapters (models/lora.py)


def save_model(model: GPT, directory: str | Path) -> None:
    save_weights(model.config, model.state_dict(), directory)


def save_weights(
    config: ModelConfig, weights: dict[str, torch.Tensor], directory: str | Path, lora: LoraConfig | None = None
) -> None:
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
    weights = read_safetensors(Path(directory) / WEIGHTS_FILE)
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
    path = Path(directory) / WEIGHTS_FILE
    with safetensors_only(path):
        safetensors.torch.load_model(model, str(path), device=device)
    return (merge_lora(model) if lora else model).to(device)


@contextmanager
def safetensors_only(path: Path):
    """Turn safetensors' refusal of a file that is not safetensors (a pickle, a torch.save zip,
    a torn copy: it reads the 8-byte header length and the JSON header, never executes
    anything) into an error the CLI prints as one line."""
    try:
        yield
    except SafetensorError as err:
        raise DataError(
            f"{path} is not a safetensors file ({err}); raylm loads weights only from safetensors"
        ) from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safetensors_only(path):
        return safetensors.torch.load_file(str(path))


def check_safetensors(path: Path) -> None:
    """Refuse a file that is not safetensors before any worker starts: reads the header only."""
    with safetensors_only(path), safetensors.safe_open(str(path), "pt"):
        pass
