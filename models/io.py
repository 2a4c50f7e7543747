"""A model directory: `model.json` (ModelConfig) and the weights, in one of two layouts:

    model.safetensors   every weight, whole (exports, merged LoRA models, imports)
    state/*.safetensors a training checkpoint's shards, one file per rank that wrote it: each
                        holds its rank's slice of every weight ("model.<name>", beside the
                        optimizer's "optim.*") and, in its header, where that slice sits in the
                        whole tensor (torch.distributed.checkpoint's Hugging Face layout)
    base.json           beside the shards of a LoRA checkpoint, which hold only the adapters:
                        the base model directory the frozen weights come from, and its
                        content hash

A directory may be local or on object storage (s3://, gs://: raylm.storage.Location); either
way tensors are read by byte ranges (models/shards.py). Loading never unpickles: safetensors
holds raw tensors only, the config is JSON, and the shards' layout is JSON in their headers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from raylm.errors import DataError  # a leaf module: no Ray, no torch
from raylm.models.config import ModelConfig
from raylm.models.gpt import GPT
from raylm.models.lora import LoraConfig, apply_lora, merge_lora
from raylm.models.shards import SafetensorsFile, ShardReader, read_part
from raylm.storage import Location, locate

WEIGHTS_FILE = "model.safetensors"
SHARDS_DIR = "state"  # a checkpoint's per-rank shards (pipelines/train/checkpoint.py writes them)
SHARDED_WEIGHT = "model."  # the prefix of a weight's name among the shards' tensors
TIED_ALIAS = "tok_emb.weight"  # with tie_embeddings, the same tensor as lm_head.weight
CONFIG_FILE = "model.json"
LORA_FILE = "lora.json"  # present when the weights include LoRA adapters (models/lora.py)
BASE_FILE = "base.json"  # a checkpoint of only what trained: where the frozen weights come from


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


def weight_files(directory: str | Path | Location) -> list[Location]:
    """The files that hold a model directory's weights: model.safetensors, or else a
    checkpoint's shards; [] if it has neither."""
    directory = locate(directory)
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    return (directory / SHARDS_DIR).glob("*.safetensors")


def check_weights(directory: str | Path | Location, what: str) -> None:
    """Refuse a directory without weights, or with a file that is not safetensors, before
    anything loads it (headers only); `what` names the directory in the error."""
    files = weight_files(directory)
    if not files:
        raise DataError(f"{what}: {directory} holds no {WEIGHTS_FILE} and no {SHARDS_DIR}/*.safetensors")
    for location in files:
        SafetensorsFile(location).close()


def load_weights(model: torch.nn.Module, directory: str | Path | Location, only: set[str] | None = None) -> None:
    """Fill `model`'s weights (or the `only` ones) in place from a model directory of either
    layout, one tensor at a time: no second copy of the model."""
    targets = untied(model.config, model.state_dict())
    if only is not None:
        targets = {k: v for k, v in targets.items() if k in only}
    read_into(targets, directory, strict=only is None)


def read_into(targets: dict[str, torch.Tensor], directory: str | Path | Location, strict: bool = False) -> None:
    """Copy each named weight of a model directory into its target tensor. A checkpoint with a
    base.json holds only what trained (LoRA adapters): the rest comes from the base it names,
    after its content hash is checked. `strict`: the directory holds no weights beyond these."""
    directory = locate(directory)
    base, trained = base_of(directory)
    if base is not None:
        if strict and trained - set(targets):  # adapters onto a model without them
            raise DataError(
                f"{directory} holds LoRA adapters this model has not ({sorted(trained - set(targets))[:2]}); "
                "use the run's merged/ model directory instead"
            )
        read_into({k: v for k, v in targets.items() if k not in trained}, base)
        targets = {k: v for k, v in targets.items() if k in trained}
    if (directory / WEIGHTS_FILE).is_file():
        copy_from_file(directory / WEIGHTS_FILE, targets, strict=strict and base is None)
        return
    check_weights(directory, "weights")
    import torch.distributed.checkpoint as dcp  # a checkpoint's layout: imported only to read one

    wanted = {SHARDED_WEIGHT + name: t for name, t in targets.items()}
    with one_process():
        dcp.load(wanted, storage_reader=ShardReader(directory / SHARDS_DIR), no_dist=True)


@contextmanager
def one_process():
    """torch.distributed.checkpoint warns on every load or save without a process group; that
    is how raylm reads a checkpoint in one process (evaluate, generate, export), not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def copy_from_file(location: Location, targets: dict[str, torch.Tensor], strict: bool) -> None:
    """Copy each target's tensor out of a safetensors file; `strict`: the file holds no others."""
    with SafetensorsFile(location) as f:
        names = set(f.keys())
        missing, extra = set(targets) - names, names - set(targets)
        if missing or (strict and extra):
            wrong = (
                f"lacks {sorted(missing)[:3]}" if missing else f"holds weights the model has not: {sorted(extra)[:3]}"
            )
            raise DataError(f"{location} {wrong}")
        for name, target in targets.items():
            if f.shape(name) != tuple(target.shape):
                raise DataError(f"{location}: {name} is {f.shape(name)}, the model's is {tuple(target.shape)}")
            with torch.no_grad():
                fill_from(f, name, target)


def fill_from(f: SafetensorsFile, name: str, target: torch.Tensor) -> None:
    """A whole stored tensor into `target`; into a DTensor (a training rank's slice of a
    sharded model) only the rows of its slice are read."""
    from torch.distributed.tensor import DTensor  # only sharded training hands one over

    if not isinstance(target, DTensor):
        target.copy_(f.read(name))
        return
    for chunk in target.__create_chunk_list__():  # this rank's slice: none when it holds no rows
        target.to_local().copy_(read_part(f, name, chunk.offsets, chunk.sizes))


def weights_digest(directory: str | Path | Location) -> str:
    """A content hash of a model directory's weights, every byte streamed (a 7B base is read
    once more, ~30 s at 1 GB/s; kept per process while the files' sizes and times stay): what
    a LoRA checkpoint records of its base, so that adapters are never combined with another
    base than the one they were trained on."""
    directory = locate(directory)
    infos = [p.info() for p in weight_files(directory)]  # one stat (a HEAD on object storage) per file
    files = tuple((i.path, i.size, i.mtime_ns) for i in infos)
    return _digest(directory, files)


@functools.lru_cache(maxsize=8)
def _digest(directory: Location, files: tuple[tuple[str, int, int | None], ...]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for path, _, _ in files:
        h.update(f"{path.removeprefix(directory.path + '/')}\0".encode())
        with directory.fs.open_input_stream(path) as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def save_base(directory: str | Path, base: str | Path, digest: str, trained: set[str]) -> None:
    """base.json: the base model a checkpoint's other weights come from, and its content hash."""
    ref = {"path": str(base), "digest": digest, "trained": sorted(trained)}
    (Path(directory) / BASE_FILE).write_text(json.dumps(ref, indent=2) + "\n")


def base_of(directory: str | Path | Location) -> tuple[Location | None, set[str]]:
    """The base a checkpoint's frozen weights come from, checked against the hash it recorded,
    and the names of the weights the checkpoint holds itself; (None, empty) without a base.json."""
    path = locate(directory) / BASE_FILE
    if not path.is_file():
        return None, set()
    ref = json.loads(path.read_text())
    base = locate(ref["path"])
    if not (base / CONFIG_FILE).is_file():
        raise DataError(f"{directory} holds adapters trained on the base {base}, which is not there")
    if weights_digest(base) != ref["digest"]:
        raise DataError(
            f"{directory} holds adapters trained on {base}, whose weights have changed since "
            "(content hash differs); merge them with the base they were trained on"
        )
    return base, set(ref["trained"])


def untied(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without the tied alias: the embedding is stored once, as the head."""
    return {k: v for k, v in weights.items() if not (config.tie_embeddings and k == TIED_ALIAS)}


def load_config(directory: str | Path | Location) -> ModelConfig:
    return ModelConfig(**json.loads((locate(directory) / CONFIG_FILE).read_text()))


def load_lora(directory: str | Path | Location) -> LoraConfig | None:
    path = locate(directory) / LORA_FILE
    return LoraConfig(**json.loads(path.read_text())) if path.is_file() else None


def load_model(directory: str | Path | Location, device: str = "cpu") -> GPT:
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
    anything) into an error the CLI prints as one line, as shards.SafetensorsFile does."""
    try:
        yield
    except SafetensorError as err:
        raise DataError(
            f"{path} is not a safetensors file ({err}); raylm loads weights only from safetensors"
        ) from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safetensors_only(path):
        return safetensors.torch.load_file(str(path))
