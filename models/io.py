"""A model directory: `model.json` (ModelConfig) and the weights, in one of two layouts:

    model.safetensors   every weight, whole (exports, merged LoRA models, imports)
    state/*.safetensors a training checkpoint's shards, one file per rank that wrote it: each
                        holds its rank's slice of every weight ("model.<name>", beside the
                        optimizer's "optim.*") and, in its header, where that slice sits in the
                        whole tensor (torch.distributed.checkpoint's Hugging Face layout)

Loading never unpickles: safetensors holds raw tensors only, the config is JSON, and the
shard layout is read by torch's HuggingFaceStorageReader (safe_open and JSON).
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
SHARDS_DIR = "state"  # a checkpoint's per-rank shards (pipelines/train/checkpoint.py writes them)
SHARDED_WEIGHT = "model."  # the prefix of a weight's name among the shards' tensors
TIED_ALIAS = "tok_emb.weight"  # with tie_embeddings, the same tensor as lm_head.weight
CONFIG_FILE = "model.json"
LORA_FILE = "lora.json"  # present when the weights include LoRA adapters (models/lora.py)


def save_model(model: GPT, directory: str | Path) -> None:
    save_weights(model.config, model.state_dict(), directory)


def save_weights(
    config: ModelConfig, weights: dict[str, torch.Tensor], directory: str | Path, lora: LoraConfig | None = None
) -> None:
    """Write a model directory from a state dict."""
    save_config(config, directory, lora)
    weights = untied(config, weights)  # one tensor under two names: safetensors stores it once
    safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / WEIGHTS_FILE))


def save_config(config: ModelConfig, directory: str | Path, lora: LoraConfig | None = None) -> None:
    """model.json, and lora.json if the weights include LoRA adapters."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if lora:
        (directory / LORA_FILE).write_text(json.dumps(lora.to_dict(), indent=2) + "\n")


def weight_files(directory: str | Path) -> list[Path]:
    """The files that hold a model directory's weights: model.safetensors, or else a
    checkpoint's shards; [] if it has neither."""
    directory = Path(directory)
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    return sorted((directory / SHARDS_DIR).glob("*.safetensors"))


def check_weights(directory: str | Path, what: str) -> None:
    """Refuse a directory without weights, or with a file that is not safetensors, before
    anything loads it (headers only); `what` names the directory in the error."""
    files = weight_files(directory)
    if not files:
        raise DataError(f"{what}: {directory} holds no {WEIGHTS_FILE} and no {SHARDS_DIR}/*.safetensors")
    for path in files:
        check_safetensors(path)


def load_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Fill `model`'s parameters in place from a model directory of either layout. From shards,
    each parameter's slices are copied straight into it: no second copy of the model."""
    directory = Path(directory)
    if (directory / WEIGHTS_FILE).is_file():
        with safetensors_only(directory / WEIGHTS_FILE):
            safetensors.torch.load_model(model, str(directory / WEIGHTS_FILE), device="cpu")
        return
    check_weights(directory, "weights")
    import torch.distributed.checkpoint as dcp  # a checkpoint's layout: imported only to read one

    wanted = {SHARDED_WEIGHT + name: t for name, t in untied(model.config, model.state_dict()).items()}
    dcp.load(wanted, storage_reader=dcp.HuggingFaceStorageReader(str(directory / SHARDS_DIR)), no_dist=True)


def untied(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without the tied alias: the embedding is stored once, as the head."""
    return {k: v for k, v in weights.items() if not (config.tie_embeddings and k == TIED_ALIAS)}


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
    load_weights(model, directory)
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
