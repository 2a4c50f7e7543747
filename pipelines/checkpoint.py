"""Training checkpoints: a model directory plus optimizer and loop state, all without pickle.

    checkpoint_000300/
        model.safetensors, model.json   models.io format: evaluate/generate load just these
        tokenizer.json                  so the directory describes itself
        train_state.safetensors         AdamW moments and the RNG state, as named tensors
        train_state.json                step, data position, optimizer hyperparameters
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import safetensors.torch
import torch

from raylm.models import GPT, save_model

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


def save_checkpoint(directory: Path, model: GPT, optimizer: torch.optim.Optimizer, state: dict, tokenizer: Path) -> None:
    save_model(model, directory)
    shutil.copyfile(tokenizer, directory / "tokenizer.json")
    opt = optimizer.state_dict()
    tensors = {f"optim.{idx}.{name}": t for idx, s in opt["state"].items() for name, t in s.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / STATE_TENSORS))
    meta = {**state, "param_groups": opt["param_groups"]}
    (directory / STATE_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def load_checkpoint(directory: Path, model: GPT, optimizer: torch.optim.Optimizer) -> dict:
    """Load weights, optimizer and RNG state in place; returns the loop state (step, loader)."""
    device = next(model.parameters()).device
    safetensors.torch.load_model(model, str(directory / "model.safetensors"), device=str(device))
    meta = json.loads((directory / STATE_JSON).read_text())
    tensors = safetensors.torch.load_file(str(directory / STATE_TENSORS))
    torch.set_rng_state(tensors.pop("rng.torch"))
    per_param: dict[int, dict] = {}
    for key, tensor in tensors.items():
        _, idx, name = key.split(".", 2)
        # AdamW keeps its `step` counter on the CPU; moments live with the parameters.
        per_param.setdefault(int(idx), {})[name] = tensor if name == "step" else tensor.to(device)
    optimizer.load_state_dict({"state": per_param, "param_groups": meta.pop("param_groups")})
    return meta


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory of a run (the one with the highest step)."""
    done = [p for p in run_dir.glob("checkpoint_*") if (p / STATE_JSON).exists()]
    return max(done, key=lambda p: p.name) if done else None
