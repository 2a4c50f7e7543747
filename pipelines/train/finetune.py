"""`raylm finetune`: continued pretraining, instruction SFT and LoRA, on the pretraining engine.

Fine-tuning is pretraining started from other weights, on other windows: this module finds
the base model (importing a Hugging Face directory if that is what it is given), prepares the
windows (sft.py, or the data pipeline with the base's tokenizer), and hands both to
pretrain.pretrain, whose workers load the base and, for LoRA, wrap it before parallelizing.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from raylm.config import RaylmConfig
from raylm.errors import ConfigError, DataError
from raylm.models import ModelConfig
from raylm.models.io import WEIGHTS_FILE, check_weights, load_config, save_config
from raylm.models.lora import LoraConfig
from raylm.models.stream import save_streaming
from raylm.pipelines.data.manifest import Manifest
from raylm.pipelines.data.prepare import prepare
from raylm.pipelines.data.sft import prepare_sft
from raylm.pipelines.train.checkpoint import torn_reason
from raylm.pipelines.train.pretrain import train_storage
from raylm.storage import Location, written_to


def resolve_base(base: str, output_dir: Path) -> Path:
    """A raylm model directory to start from: the given checkpoint or model directory, or a
    Hugging Face Llama directory imported once under <output_dir>/base/."""
    path = Path(base).expanduser().resolve()
    if (path / "model.json").is_file():
        if (path / "COMMIT.json").exists() or path.name.startswith("checkpoint_"):
            reason = torn_reason(path)
            if reason:
                raise DataError(f"finetune.base: {path} is not a whole checkpoint ({reason})")
        if not (path / "tokenizer.json").is_file():
            raise DataError(
                f"finetune.base: {path} has no tokenizer.json; fine-tuning needs the base model's tokenizer"
            )
        check_weights(path, "finetune.base")  # the workers load it; refuse it before they start
        return path
    if (path / "config.json").is_file():
        return import_base(path, output_dir)
    raise DataError(
        f"finetune.base: {path} is neither a raylm model directory (model.json) nor a Hugging Face one (config.json)"
    )


def import_base(hf_dir: Path, output_dir: Path) -> Path:
    from raylm.models.hf import NotConvertible, import_hf

    if not (hf_dir / "tokenizer.json").is_file():
        raise DataError(f"finetune.base: {hf_dir} has no tokenizer.json (a fast tokenizer is needed)")
    out = output_dir / "base" / hf_content_key(hf_dir)
    if not (out / "model.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            import_hf(hf_dir, tmp)
        except NotConvertible as err:
            raise DataError(f"finetune.base: {err}") from None
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # whole or absent: an import that died midway is not reused
        print(f"[finetune] imported {hf_dir} -> {out}", flush=True)
    return out


def hf_content_key(hf_dir: Path) -> str:
    """The import's cache key, from what it is made of: the JSON files (config, tokenizer, shard
    index) by content, and each weights file by name, size and modification time (hashing
    gigabytes of safetensors on every start would take minutes). New weights at the same path
    are imported again, not served from the old import."""
    h = hashlib.sha256()
    for path in sorted(hf_dir.iterdir()):
        if path.suffix == ".json" and path.is_file():
            h.update(f"{path.name}\0".encode() + path.read_bytes() + b"\0")
        elif path.suffix == ".safetensors":
            stat = path.stat()
            h.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
    return h.hexdigest()[:12]


def check_fits(cfg: RaylmConfig, base: Path, model: ModelConfig) -> None:
    """The run must not be the base's own run (Ray Train would resume it instead of starting
    the fine-tune), and its windows must fit the base's context."""
    own_run = (train_storage(cfg.run) / cfg.run.name).local
    if own_run and own_run in base.parents:
        raise ConfigError(
            f"run.name={cfg.run.name!r} is the base checkpoint's own run; give the fine-tune its own run.name"
        )
    if cfg.data.seq_len > model.block_size:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the base model's block_size={model.block_size}")


def finetune_windows(cfg: RaylmConfig, base: Path) -> Manifest:
    """The manifest of the windows to train on: instruction data (sft) or a corpus (cpt), in
    both cases tokenized with the base model's tokenizer."""
    output_dir = Path(cfg.run.output_dir).resolve()
    tokenizer = base / "tokenizer.json"
    if cfg.finetune.mode == "sft":
        return prepare_sft(cfg.finetune.sft, tokenizer, cfg.data.seq_len, cfg.data.strict, output_dir)
    return prepare(cfg.data, cfg.tokenizer.model_copy(update={"path": str(tokenizer)}), output_dir)


def lora_config(cfg: RaylmConfig) -> LoraConfig | None:
    lora = cfg.finetune.lora
    return LoraConfig(lora.rank, lora.alpha, lora.dropout, tuple(lora.targets)) if lora.enabled else None


def load_base_config(base: Path, vocab: int) -> ModelConfig:
    model = load_config(base)
    if vocab > model.vocab_size:
        raise DataError(f"the base tokenizer has {vocab} tokens but the model only {model.vocab_size} embeddings")
    return model


def merge_on_a_worker(checkpoint: Location, out: Location) -> Location:
    """merge_checkpoint as a Ray task with a CPU of its own: on a cluster the merge's reads and
    writes (a 7B model's 28 GB each way) land on a worker node, not on the head pod that runs
    the driver. `out` must be storage the workers share, as checkpoints are."""
    import ray

    return ray.get(ray.remote(num_cpus=1)(merge_checkpoint).remote(checkpoint, out))


def merge_checkpoint(checkpoint: Location, out: Location) -> Location:
    """A LoRA checkpoint as a plain model directory (adapters folded into the weights), with its
    tokenizer: what export-hf, evaluation and serving want. Either may be on object storage."""
    with written_to(out) as local:
        save_config(load_config(checkpoint), local)
        save_streaming(checkpoint, local / WEIGHTS_FILE)  # adapters folded in, a block at a time
        (local / "tokenizer.json").write_bytes((checkpoint / "tokenizer.json").read_bytes())
    return out
