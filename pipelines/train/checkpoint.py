"""Training checkpoints: a model directory plus optimizer and loop state, all without pickle.

    checkpoint_000300/
        model.safetensors, model.json   models.io format: evaluate/generate load just these
        lora.json                       LoRA fine-tuning only: rank, alpha, targets (models/lora.py)
        tokenizer.json                  so the directory describes itself
        train_state.safetensors         AdamW moments by parameter name, and the RNG state
        train_state.json                step, data position, optimizer hyperparameters
        COMMIT.json                     written last: every other file and its size

A checkpoint counts only when COMMIT.json is there and every file it lists has its size: a
copy cut short (a crash while Ray uploads it, a full disk) is skipped with a log line, and
the previous checkpoint is used.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import safetensors.torch
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from raylm.models import ModelConfig
from raylm.models.io import read_safetensors, read_weights, save_weights
from raylm.models.lora import LoraConfig

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
COMMIT = "COMMIT.json"


def save_checkpoint(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, tokenizer: Path
) -> None:
    """Single-process form of gather_state + write_checkpoint."""
    weights, optim = gather_state(model, optimizer)
    write_checkpoint(directory, model.config, weights, optim, state, tokenizer)


def gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Whole weights and optimizer state, keyed by parameter name, on the CPU. Under FSDP each
    rank holds a shard and this all-gathers: every rank calls it and rank 0 gets the result.
    Names instead of shard layouts make the files the same under DDP, FSDP and any worker count."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def write_checkpoint(
    directory: Path,
    config: ModelConfig,
    weights: dict,
    optim: dict,
    state: dict,
    tokenizer: Path,
    lora: LoraConfig | None = None,
) -> None:
    save_weights(config, weights, directory, lora)
    shutil.copyfile(tokenizer, directory / "tokenizer.json")
    tensors = {f"optim.{name}.{key}": t for name, s in optim["state"].items() for key, t in s.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / STATE_TENSORS))
    meta = {**state, "param_groups": optim["param_groups"]}
    (directory / STATE_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    write_commit(directory)


def write_commit(directory: Path) -> None:
    # Sizes, not hashes: a torn copy is a short or missing file, and hashing a 7B model's
    # 84 GB of weights and optimizer state would add a minute to every checkpoint.
    sizes = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != COMMIT}
    (directory / COMMIT).write_text(json.dumps(sizes, indent=2) + "\n")


def torn_reason(directory: Path) -> str | None:
    """Why this checkpoint directory is incomplete, or None if it is whole."""
    if not (directory / COMMIT).is_file():
        return f"no {COMMIT}"
    try:
        sizes = json.loads((directory / COMMIT).read_text())
    except ValueError:
        return f"{COMMIT} is unreadable"
    for name, size in sizes.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def usable_checkpoint(directory: Path, later: bool = False) -> Path | None:
    """`directory` if whole, else the newest whole checkpoint before it in the same run
    directory; each torn one is skipped with a log line. With `later` (the run's own checkpoint,
    handed back by Ray Train), a whole one after it wins.

    Why later ones: Ray Train records a checkpoint when its controller next polls the
    workers, so a worker killed right after writing checkpoints N+1 and N+2 (seen: 2 steps at
    one checkpoint per step) leaves Ray handing back N. COMMIT.json says they are whole."""
    candidates = sorted((p for p in directory.parent.glob("checkpoint_*") if p.is_dir()), reverse=True)
    newer = [p for p in candidates if p.name > directory.name] if later else []
    older = [p for p in candidates if p.name < directory.name]
    for candidate in newer:
        if torn_reason(candidate) is None:
            print(
                f"[checkpoint] {candidate.name} is newer than the {directory.name} Ray Train recorded "
                "(its report was not collected before the failure): resuming from it",
                flush=True,
            )
            return candidate
    for candidate in [directory, *older]:
        reason = torn_reason(candidate)
        if reason is None:
            return candidate
        print(f"[checkpoint] skipping {candidate}: torn ({reason})", flush=True)
    return None


def load_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load weights, optimizer and RNG state in place (each rank takes its shard of the whole
    tensors under FSDP); returns the loop state (step, data position)."""
    weights = read_weights(directory, model.config)
    meta = json.loads((directory / STATE_JSON).read_text())
    tensors = read_safetensors(directory / STATE_TENSORS)
    torch.set_rng_state(tensors.pop("rng.torch"))
    per_param: dict[str, dict] = {}
    for key, tensor in tensors.items():
        name, _, field = key.removeprefix("optim.").rpartition(".")  # parameter names contain dots
        per_param.setdefault(name, {})[field] = tensor
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    optim = {"state": per_param, "param_groups": meta.pop("param_groups")}
    set_optimizer_state_dict(model, optimizer, optim, options=options)
    return meta


def whole_checkpoints(run_dir: Path) -> list[Path]:
    """A run's whole checkpoint directories, oldest first (names sort by step)."""
    return sorted(
        (p for p in run_dir.glob("checkpoint_*") if p.is_dir() and torn_reason(p) is None), key=lambda p: p.name
    )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest whole checkpoint directory of a run (the one with the highest step)."""
    done = whole_checkpoints(run_dir)
    return done[-1] if done else None
