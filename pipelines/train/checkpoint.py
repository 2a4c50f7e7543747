"""Training checkpoints: every rank writes its own shard of the state at once, nothing is
gathered, and nothing is ever unpickled.

    checkpoint_000300/
        model.json, lora.json   models.io format (lora.json: LoRA fine-tuning only)
        tokenizer.json          so the directory describes itself
        state/shard-RRRRR-model-BBBBB-of-NNNNN.safetensors
                                rank R's slice of block B's weights ("model.<name>") and AdamW
                                moments ("optim.state.<name>.<field>"), each with its offset in
                                the whole tensor (torch.distributed.checkpoint's Hugging Face
                                layout), so any worker count and strategy reads it back; file N
                                holds the embedding, final norm and head
        base.json               LoRA only: the shards then hold just the adapters, and this
                                names the base the frozen weights come from (path, content hash)
        train_state.json        step, data position, optimizer hyperparameters, RNG state
        COMMIT.json             written last: every other file (every rank's) and its size

Under FSDP2 a rank writes and reads 1/world of the state; under DDP, where every rank holds it
all, torch splits the writing across ranks. Ray Train uploads each rank's directory into the
same checkpoint directory. A checkpoint counts only when COMMIT.json is there and every file it
lists has its size: a copy cut short (a crash during an upload, a full disk, a rank that died)
is skipped with a log line, and the previous checkpoint is used.

The run's checkpoints may live on a local disk, a shared volume or object storage (s3://,
gs://; run.checkpoint_dir): everything that finds, checks and loads them goes through
raylm.storage.Location, and a resuming rank reads by byte ranges only the slices it keeps.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from raylm.errors import DataError
from raylm.models.io import (
    BASE_FILE,
    SHARDED_WEIGHT,
    SHARDS_DIR,
    TIED_ALIAS,
    WEIGHTS_FILE,
    check_weights,
    one_process,
    save_base,
    save_config,
    untied,
)
from raylm.models.lora import LoraConfig
from raylm.models.shards import ShardReader
from raylm.storage import Location, locate

STATE_JSON = "train_state.json"
COMMIT = "COMMIT.json"
OPTIM = "optim."  # the prefix of an optimizer tensor's name among the shards' tensors
# AdamW's state under flat names ("state.<param>.exp_avg", "param_groups.<param>.lr"): tensors
# go to the shards, the hyperparameters (plain numbers) to train_state.json.
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    tokenizer: Path,
    lora: LoraConfig | None = None,
    base: BaseRef | None = None,
) -> None:
    """Every rank calls this with its own `directory` (they may be on different nodes); each
    writes its shard there, and rank 0 also the small files and COMMIT.json, which lists every
    rank's shards. The model is the plain one (`model`, not its DDP wrapper). Frozen weights
    (a LoRA run's base) are not written: `base` says where they come from."""
    Save(directory, model, optimizer, state, tokenizer, lora, base).finish()


class Save:
    """One checkpoint being written. In the foreground the shards are written before the
    constructor returns; in the background (`background=True`) the constructor returns once
    the state is copied to host memory (torch's dcp.async_save), so training may change it
    while a thread writes the copy. `finish` (every rank, at the same step) waits for the
    writes and adds the small files and COMMIT.json."""

    def __init__(
        self,
        directory: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict,
        tokenizer: Path,
        lora: LoraConfig | None = None,
        base: BaseRef | None = None,
        background: bool = False,
    ):
        directory.mkdir(parents=True, exist_ok=True)
        tensors, hyper = state_tensors(model, optimizer)
        frozen = frozen_names(model)
        if frozen and base is None:
            raise ValueError(f"{len(frozen)} frozen weights and no base to name for them ({sorted(frozen)[:2]})")
        files = {name: file_of(name, model.config.n_layer) for name in tensors}
        writer = dcp.HuggingFaceStorageWriter(str(directory / SHARDS_DIR), files, save_distributed=True)
        alone = not dist.is_initialized()
        with one_process() if alone else nullcontext():
            if background:
                self.writing = dcp.async_save(
                    tensors, storage_writer=writer, async_stager=HostCopy(), process_group=side_group(), no_dist=alone
                )
            else:
                dcp.save(tensors, storage_writer=writer, no_dist=alone)
                self.writing = None
        self.directory, self.config, self.lora, self.tokenizer = directory, model.config, lora, tokenizer
        trained = {k.removeprefix(SHARDED_WEIGHT) for k in tensors if k.startswith(SHARDED_WEIGHT)}
        self.base = (base, trained) if frozen else None
        rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()  # every rank resumes from rank 0's
        self.meta = {**state, "optimizer": hyper, "rng_torch": rng}

    def written_everywhere(self, device: torch.device) -> bool:
        """Whether every rank's background write is done: a collective, so that all ranks
        finish (and report) the checkpoint at the same step."""
        done = torch.tensor([self.writing is None or self.writing.done()], dtype=torch.int32, device=device)
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return bool(done.item())

    def finish(self) -> None:
        if self.writing is not None:
            self.writing.result()  # raises what the writing thread raised
        shards = every_ranks_files(self.directory)
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        save_config(self.config, self.directory, self.lora)
        if self.base:
            save_base(self.directory, self.base[0].path, self.base[0].digest, self.base[1])
        shutil.copyfile(self.tokenizer, self.directory / "tokenizer.json")
        (self.directory / STATE_JSON).write_text(json.dumps(self.meta, indent=2) + "\n")
        write_commit(self.directory, shards)


class HostCopy:
    """Stages the state for a background save (torch's AsyncStager protocol): each rank's
    local tensors copied to host memory, DTensors keeping their place in the whole tensor. The
    writer's own stager took 2.4 s for 1 GB of FSDP2 shards here (2 CPU ranks), this 0.3 s."""

    should_synchronize_after_execute = False

    def stage(self, state: dict) -> dict:
        return {name: host_copy(t) for name, t in state.items()}

    def synchronize_staging(self) -> None:  # stage() returns once the copy is made
        pass

    def close(self) -> None:
        pass


def host_copy(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, DTensor):
        local = t.to_local().to("cpu", copy=True)
        return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
    return t.detach().to("cpu", copy=True)


@functools.cache
def side_group() -> dist.ProcessGroup | None:
    """A gloo group of every rank for background saves: their planning collectives run in
    torch's writer thread while training uses the default group (NCCL on GPUs)."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """This rank's part of the training state: tensors by name (each a DTensor shard under
    FSDP2, the tensor itself under DDP; views of the live state, no copies), and the optimizer's
    non-tensor entries. A fresh optimizer gets its (zero) moments first, so the names are the
    same before the first step as after it: a load fills exactly what a save wrote."""
    frozen = frozen_names(model)
    weights = {k: v for k, v in untied(model.config, get_model_state_dict(model)).items() if k not in frozen}
    optim = get_optimizer_state_dict(model, optimizer, options=FLAT)
    tensors = {SHARDED_WEIGHT + k: v for k, v in weights.items()}
    tensors.update({OPTIM + k: v for k, v in optim.items() if isinstance(v, torch.Tensor)})
    return tensors, {k: v for k, v in optim.items() if not isinstance(v, torch.Tensor)}


def frozen_names(model: torch.nn.Module) -> set[str]:
    """The weights training does not change (under LoRA, the base's), by every name they have."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


@dataclass(frozen=True)
class BaseRef:
    """The base model a fine-tuning run started from: its directory and content hash
    (models.io.weights_digest, computed once by the driver)."""

    path: str
    digest: str


def file_of(name: str, n_layer: int) -> int:
    """Which of a rank's files holds a tensor: one file per block (1..n_layer), the embedding,
    final norm and head in the last. torch's writer builds each file whole in memory before
    writing it (safetensors.torch.save), so this bounds that copy by one block's share of the
    rank's state (at 7B on 64 ranks: 2.4 GB / 64) instead of the whole share."""
    block = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
    return int(block.group(1)) + 1 if block else n_layer + 1


def every_ranks_files(directory: Path) -> dict[str, int]:
    """The shard files every rank wrote (names relative to the checkpoint) and their sizes:
    COMMIT.json must list files rank 0 never sees, since each rank's directory may be on its own
    node until Ray Train uploads them into one."""
    mine = {f"{SHARDS_DIR}/{p.name}": p.stat().st_size for p in sorted((directory / SHARDS_DIR).iterdir())}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    everyone: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)  # a few names and sizes per rank, between the job's own ranks
    return {name: size for files in everyone for name, size in files.items()}


def write_commit(directory: Path, elsewhere: dict[str, int] | None = None) -> None:
    """COMMIT.json: every file under `directory` and `elsewhere` (other ranks' shards, by name
    relative to the checkpoint), with their sizes."""
    # Sizes, not hashes: a torn copy is a short or missing file, and hashing a 7B model's
    # 84 GB of weights and optimizer state would add a minute to every checkpoint.
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != COMMIT)
    sizes = {**(elsewhere or {}), **{p.relative_to(directory).as_posix(): p.stat().st_size for p in files}}
    (directory / COMMIT).write_text(json.dumps(dict(sorted(sizes.items())), indent=2) + "\n")


def torn_reason(directory: str | Path | Location) -> str | None:
    """Why this checkpoint directory is incomplete, or None if it is whole (one listing of it,
    not a request per file: a 7B checkpoint on 64 ranks has 2,112 shards)."""
    directory = locate(directory)
    try:
        sizes = json.loads((directory / COMMIT).read_text())
    except FileNotFoundError:
        return f"no {COMMIT}"
    except ValueError:
        return f"{COMMIT} is unreadable"
    there = dict(directory.files())
    for name, size in sizes.items():
        if name not in there:
            return f"{name} is missing"
        if there[name] != size:
            return f"{name} has {there[name]} bytes, {size} were written"
    return None


def usable_checkpoint(directory: str | Path | Location, later: bool = False) -> Location | None:
    """`directory` if whole, else the newest whole checkpoint before it in the same run
    directory; each torn one is skipped with a log line. With `later` (the run's own checkpoint,
    handed back by Ray Train), a whole one after it wins.

    Why later ones: Ray Train records a checkpoint when its controller next polls the
    workers, so a worker killed right after writing checkpoints N+1 and N+2 (seen: 2 steps at
    one checkpoint per step) leaves Ray handing back N. COMMIT.json says they are whole."""
    directory = locate(directory)
    candidates = directory.parent.subdirs("checkpoint_*")[::-1]
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


def load_checkpoint(
    directory: str | Path | Location,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    base: BaseRef | None = None,
) -> dict:
    """Load weights, optimizer and RNG state in place: each rank reads from the shards only the
    slices it keeps (under FSDP2 its 1/world, whatever the worker count that wrote them; under
    DDP all of it). A LoRA checkpoint fills only the adapters: `model` already holds `base`,
    which must be the one they were trained on. Returns the loop state (step, data position)."""
    directory = locate(directory)
    check_resumable(directory)
    check_same_base(directory, base)
    tensors, hyper = state_tensors(model, optimizer)
    reader = ShardReader(directory / SHARDS_DIR)
    alone = not dist.is_initialized()
    with one_process() if alone else nullcontext():
        dcp.load(tensors, storage_reader=reader, no_dist=alone)
    meta = json.loads((directory / STATE_JSON).read_text())
    weights = {k.removeprefix(SHARDED_WEIGHT): v for k, v in tensors.items() if k.startswith(SHARDED_WEIGHT)}
    if model.config.tie_embeddings and "lm_head.weight" in weights:
        weights[TIED_ALIAS] = weights["lm_head.weight"]
    set_model_state_dict(model, weights, options=StateDictOptions(strict=not frozen_names(model)))
    optim = {k.removeprefix(OPTIM): v for k, v in tensors.items() if k.startswith(OPTIM)}
    set_optimizer_state_dict(model, optimizer, {**hyper, **meta.pop("optimizer"), **optim}, options=FLAT)
    rng = bytearray(base64.b64decode(meta.pop("rng_torch")))
    torch.set_rng_state(torch.frombuffer(rng, dtype=torch.uint8))
    stored = sum(size for _, size in (directory / SHARDS_DIR).files())
    return {**meta, "bytes_read": reader.bytes_read, "bytes_stored": stored}


def check_same_base(directory: Location, base: BaseRef | None) -> None:
    recorded = json.loads((directory / BASE_FILE).read_text())["digest"] if (directory / BASE_FILE).is_file() else None
    if recorded != (base.digest if base else None):
        raise DataError(
            f"{directory} was trained from another base than this run's "
            f"({'none' if recorded is None else 'content hash ' + recorded})"
        )


def check_resumable(directory: str | Path | Location) -> None:
    """Refuse what cannot resume before reading it: a shard that is not safetensors (headers
    only), or a checkpoint of raylm before sharded saves (one model.safetensors and a
    train_state.safetensors), which still evaluates and exports."""
    directory = locate(directory)
    if (directory / WEIGHTS_FILE).is_file() and not (directory / SHARDS_DIR).is_dir():
        raise DataError(
            f"{directory} is a whole-state checkpoint of an earlier raylm; resuming needs the sharded "
            f"layout ({SHARDS_DIR}/). Use it as finetune.base to continue from its weights, or export it"
        )
    check_weights(directory, "checkpoint")


def checkpoint_name(step: int, taken: set[str]) -> str:
    """checkpoint_NNNNNN, or checkpoint_NNNNNN.K where an earlier launch left one of that step
    (a torn copy the resume skipped). Ray Train deletes rotated checkpoints by the path it
    registered, so a new checkpoint under a registered name would be deleted with the old one
    (seen on S3: Ray then failed on the missing path). Names still sort by step."""
    name, k = f"checkpoint_{step:06d}", 0
    while name in taken:
        k += 1
        name = f"checkpoint_{step:06d}.{k}"
    return name


def step_of(checkpoint: Location) -> int:
    return int(checkpoint.name.removeprefix("checkpoint_").split(".")[0])


def whole_checkpoints(run_dir: str | Path | Location) -> list[Location]:
    """A run's whole checkpoint directories, oldest first (names sort by step)."""
    return [p for p in locate(run_dir).subdirs("checkpoint_*") if torn_reason(p) is None]


def latest_checkpoint(run_dir: str | Path | Location) -> Location | None:
    """The newest whole checkpoint directory of a run (the one with the highest step)."""
    done = whole_checkpoints(run_dir)
    return done[-1] if done else None
