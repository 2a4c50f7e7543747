"""One typed config tree for every raylm command, loaded from YAML plus `--set a.b=c` overrides.

Each section is its own class, and each component receives only its section.
Unknown keys and wrong types fail at load time, before Ray starts, with the full key path.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raylm.errors import ConfigError
from raylm.fmt import redact

URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # s3:// gs:// hf:// http(s):// file:// ...


def _local_path(value: str) -> str:
    """Keys the runtime opens as files on the machine that reads them (eval texts, the
    decontamination sets, tokenizer.path, finetune.base): a URI would be taken for a folder named
    "s3:". Inputs that pyarrow reads from object storage are data.sources and finetune.sft.sources."""
    if URI.match(value):
        raise ValueError(
            f"{redact(value)} is a URI, but this key is read as a local path (raylm does not read it from "
            "object storage): copy it to local disk, or on a cluster onto the run volume (cluster.storage.mount_path)"
        )
    return value


LocalPath = Annotated[str, AfterValidator(_local_path)]


class Section(BaseModel):
    # coerce_numbers_to_str: `--set run.name=123` names a run "123"; no inf/nan anywhere.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False)


class RunSection(Section):
    name: str = Field("quickstart", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = "runs"  # prepared data, samples, checkpoints by default; a local path or mounted volume
    # Where checkpoints go (<checkpoint_dir>/<name>/checkpoint_NNNNNN/): <output_dir>/train by
    # default; a local path, a mounted volume, or object storage (s3://bucket/prefix, gs://...).
    checkpoint_dir: str | None = None
    seed: int = 1337

    @field_validator("output_dir")
    @classmethod
    def _not_a_uri(cls, value: str) -> str:
        if URI.match(value):
            raise ValueError(
                f"{redact(value)} is a URI: prepared data and samples need a local path or a mounted volume; "
                "put checkpoints on object storage with run.checkpoint_dir (s3:// or gs://)"
            )
        return value

    @field_validator("checkpoint_dir")
    @classmethod
    def _a_store_checkpoints_can_use(cls, value: str | None) -> str | None:
        if value and URI.match(value) and not value.startswith(("s3://", "gs://")):
            raise ValueError(f"{redact(value)}: checkpoints go to a local path, a mounted volume, s3:// or gs://")
        return value


class GrammarSection(Section):
    """The built-in corpus: text from a probabilistic grammar whose entropy is known exactly."""

    num_docs: int = Field(20_000, gt=0)
    seed: int = 0


class SourceSection(Section):
    """One input of the corpus: files of one format, sampled with a mixing weight."""

    paths: list[str] = Field(min_length=1)  # files, directories, globs or s3:// gs:// hf:// URIs
    name: str | None = None  # in reports and metrics; default: the first path's file or folder name
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"  # auto: by file suffix
    text_field: str = "text"  # JSONL key / Parquet column holding the document
    doc_boundary: Literal["paragraph", "line", "file"] = "paragraph"  # how plain text splits into documents
    # Share of the train tokens relative to the other sources' weights; unset on every source:
    # keep the natural proportions. Sources are subsampled, or repeated up to data.max_repeats
    # times, to reach the shares.
    weight: float | None = Field(None, gt=0)
    # auto: each document goes to train/val/test by a hash of its text (data.val_fraction,
    # data.test_fraction). train/val/test: the whole source goes there, e.g. a held-out file.
    split: Literal["auto", "train", "val", "test"] = "auto"


class QualitySection(Section):
    """Gopher-style heuristics (Rae et al. 2021, appendix A): a document failing one is dropped."""

    enabled: bool = False  # off by default: tuned for web text, they drop verse and dialogue
    min_words: int = Field(50, ge=0)
    max_words: int = Field(100_000, gt=0)
    min_mean_word_length: float = Field(3.0, ge=0)
    max_mean_word_length: float = Field(10.0, gt=0)
    max_symbol_word_ratio: float = Field(0.1, ge=0)  # "#" and "..." per word
    min_alpha_word_fraction: float = Field(0.8, ge=0, le=1)  # words with at least one letter
    max_duplicate_line_fraction: float = Field(0.3, ge=0, le=1)
    max_top_bigram_fraction: float = Field(0.2, ge=0, le=1)  # characters in the most common word bigram


class CleanSection(Section):
    normalize: bool = True  # Unicode NFC, control characters out, trailing spaces trimmed
    strip_boilerplate: bool = True  # Project Gutenberg header and licence footer
    scrub_pii: bool = True  # e-mail addresses, phone numbers, IP addresses -> placeholders
    # Off by default: a generative model must learn to produce the text these remove.
    lowercase: bool = False
    remove_stopwords: bool = False
    min_chars: int = Field(1, ge=1)  # after cleaning
    max_chars: int = Field(1_000_000, gt=0)  # longer documents, as read (e.g. a 50 MB line), are dropped
    quality: QualitySection = QualitySection()


class DedupSection(Section):
    exact: bool = True  # same text after normalization (case, whitespace)
    near: bool = True  # MinHash + LSH over word shingles
    threshold: float = Field(0.8, gt=0, le=1)  # estimated Jaccard similarity that counts as a duplicate
    num_perm: int = Field(128, gt=0)
    # LSH bands (num_perm / bands rows each). None: the fewest bands that make a pair at the
    # threshold a candidate with 99% probability; candidates are then confirmed by signature.
    bands: int | None = Field(None, gt=0)
    shingle_words: int = Field(5, gt=0)

    @model_validator(mode="after")
    def _bands_divide(self) -> DedupSection:
        if self.bands and self.num_perm % self.bands:
            raise ValueError(f"num_perm={self.num_perm} must be divisible by bands={self.bands}")
        return self


class DecontaminateSection(Section):
    eval_paths: list[LocalPath] = []  # JSONL eval sets (local paths or globs); every string field of a row is eval text
    ngram_words: int = Field(13, gt=0)  # GPT-3's decontamination used 13-grams
    drop: bool = False  # False: report contaminated documents, keep them


class DataSection(Section):
    sources: list[SourceSection] = []  # empty: the built-in grammar corpus
    grammar: GrammarSection = GrammarSection()
    clean: CleanSection = CleanSection()
    dedup: DedupSection = DedupSection()
    decontaminate: DecontaminateSection = DecontaminateSection()
    val_fraction: float = Field(0.05, gt=0, lt=1)
    test_fraction: float = Field(0.0, ge=0, lt=1)
    seq_len: int = Field(128, gt=1)  # tokens per training window (each row holds seq_len + 1)
    strict: bool = False  # corrupt input fails naming file and line, instead of being counted
    # Store the cleaned train documents instead of their token windows; training packs the
    # same windows on the fly with Ray Data (no tokenized copy; resume needs the same workers).
    streaming: bool = False
    reject_samples: int = Field(5, ge=0)  # rejected documents kept per reason in the report
    # With weights: the most times a source's train documents may appear (epochs of it) to meet
    # its share. 1 only subsamples, so up-weighting a small source throws away most of a large
    # one; 4 is where repeated data still helps about as much as new data (Muennighoff et al.
    # 2023, "Scaling Data-Constrained Language Models").
    max_repeats: float = Field(1.0, ge=1, le=64)

    @model_validator(mode="after")
    def _splits_and_weights(self) -> DataSection:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave data for training")
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            raise ValueError("sources: give every source a weight, or none (natural proportions)")
        return self


class TokenizerSection(Section):
    vocab_size: int = Field(2048, ge=300)  # byte-level BPE starts from 256 byte symbols
    min_frequency: int = Field(2, ge=1)
    eos_token: str = "<|endoftext|>"  # joins documents in the packed stream
    # More tokens the BPE keeps whole, e.g. chat markers: special ids right after eos_token's, in
    # this order (a trained tokenizer only; tokenizer.path brings its own).
    special_tokens: list[Annotated[str, Field(min_length=1)]] = []
    sample_bytes: int = Field(200_000_000, gt=0)  # cleaned training text the BPE trainer sees
    path: LocalPath | None = None  # an existing tokenizer.json (a local file) to reuse instead of training one

    @field_validator("special_tokens")
    @classmethod
    def _distinct(cls, tokens: list[str]) -> list[str]:
        repeated = sorted({t for t in tokens if tokens.count(t) > 1})
        if repeated:
            raise ValueError(f"listed more than once: {', '.join(repeated)}")
        return tokens

    @model_validator(mode="after")
    def _trained_or_given(self) -> TokenizerSection:
        if self.path and self.special_tokens:
            raise ValueError("special_tokens are trained into a new tokenizer; tokenizer.path brings its own")
        return self


# Shapes only: the vocabulary comes from the tokenizer the data was prepared with. GPT-2/3
# shapes (Radford et al. 2019, Brown et al. 2020 table 2.1) in this Llama-style block; the
# llama-* presets are Llama 3.2 1B/3B and Llama 2 7B as published.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=128),  # tests, seconds on CPU
    "124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "760m": dict(n_layer=24, n_head=16, n_embd=1536, block_size=2048),
    "1.3b": dict(n_layer=24, n_head=16, n_embd=2048, block_size=2048),
    "llama-1b": dict(
        n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, ffn_hidden=8192, block_size=8192, rope_theta=500000.0
    ),
    "llama-3b": dict(
        n_layer=28, n_head=24, n_kv_head=8, n_embd=3072, ffn_hidden=8192, block_size=8192, rope_theta=500000.0
    ),
    "llama-7b": dict(n_layer=32, n_head=32, n_embd=4096, ffn_hidden=11008, block_size=4096, tie_embeddings=False),
}


class RopeScaling(Section):
    """Llama 3.1's RoPE frequency scaling (HF rope_type "llama3"), which stretches a model
    pretrained on original_max_position_embeddings tokens to a longer context: frequencies whose
    wavelength exceeds original/low_freq_factor are divided by `factor`, those shorter than
    original/high_freq_factor kept, and those between interpolated. Llama 3.1 and 3.2 publish
    factor 8 and 32, low 1, high 4, original 8192 (models/gpt.py: llama3_inv_freq)."""

    rope_type: Literal["llama3"] = "llama3"  # the only scaling raylm computes; HF's linear, yarn, ... are not
    factor: float = Field(gt=0)
    low_freq_factor: float = Field(gt=0)
    high_freq_factor: float = Field(gt=0)
    original_max_position_embeddings: int = Field(gt=0)

    @model_validator(mode="after")
    def _band_ordered(self) -> RopeScaling:
        # The interpolation divides by high - low: equal factors leave no band, reversed ones invert it.
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor={self.high_freq_factor} must exceed low_freq_factor={self.low_freq_factor}"
            )
        return self


class ModelShape(Section):
    """The model's shape, defined and checked once: the config's model section (ModelSection)
    and the model itself (raylm.models.config.ModelConfig) both extend it."""

    n_layer: int = Field(4, gt=0)
    n_head: int = Field(4, gt=0)
    n_kv_head: int | None = Field(None, gt=0)  # None: = n_head (plain multi-head attention)
    n_embd: int = Field(128, gt=0)
    block_size: int = Field(128, gt=0)  # longest context the RoPE tables cover
    ffn_hidden: int | None = Field(None, gt=0)  # None: Llama's rule, see ModelConfig.ffn_width()
    dropout: float = Field(0.0, ge=0, lt=1)
    tie_embeddings: bool = True
    rope_theta: float = Field(10_000.0, gt=0)
    rope_scaling: RopeScaling | None = None  # None: plain RoPE; imported Llama 3.1/3.2 checkpoints bring theirs
    vocab_size: int | None = Field(None, gt=0)  # None: the tokenizer's, padded to a multiple of 64
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (OLMo 2, Qwen3): tames logit growth at high lr

    @model_validator(mode="after")
    def _shapes_fit(self) -> ModelShape:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head dim n_embd/n_head={self.n_embd // self.n_head} must be even (RoPE)")
        return self


class ModelSection(ModelShape):
    """A preset's shape (PRESETS above), with any field given beside it winning:
    `model: {preset: 124m, n_layer: 6}`. Without a preset, the fields' defaults. A preset
    --set on the command line over a file's own shape fields is refused (load_raw)."""

    preset: Literal[tuple(PRESETS)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _preset_first(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data  # an unknown preset name fails on the field, listing the valid ones


class TrainSection(Section):
    max_steps: int = Field(300, gt=0)
    batch_size: int = Field(32, gt=0)  # global sequences per optimizer step, all workers together
    batch_tokens: int | None = Field(
        None, gt=0
    )  # or the global batch in tokens: batch_size = batch_tokens / data.seq_len
    micro_batch_size: int = Field(16, gt=0)  # sequences per worker per forward pass
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = Field(30, ge=0)
    # cosine: decay from the end of warmup to max_steps. wsd (warmup-stable-decay): hold lr,
    # then decay linearly over the last decay_fraction of the steps.
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0, le=1)
    activation_checkpointing: bool = (
        False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    )
    compile: bool = False  # torch.compile each block: fused kernels; the first steps pay the compile time
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    # A step whose global gradient norm is inf or NaN is never applied. "fail" stops the run
    # (its last checkpoint stays the newest state); "skip" drops that step's update and goes on,
    # failing only after max_skipped_steps in a row (a diverged run skips every step).
    on_nonfinite: Literal["fail", "skip"] = "fail"
    max_skipped_steps: int = Field(5, gt=0)
    log_interval: int = Field(10, gt=0)
    eval_interval: int = Field(100, gt=0)
    eval_windows: int = Field(64, gt=0)  # validation windows scored at each eval_interval
    checkpoint_interval: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    # Write checkpoints in the background: a step waits only for the copy of the state to host
    # memory (which costs a second copy of each rank's share while it is written).
    async_save: bool = False
    # Budgets: training stops at the first one spent, with a final checkpoint (None: no limit).
    max_tokens: int | None = Field(None, gt=0)
    max_hours: float | None = Field(None, gt=0)
    max_usd: float | None = Field(None, gt=0)  # priced by pipelines/train/cost.py, or scaling.price_per_hour


class ScalingSection(Section):
    num_workers: int = Field(2, gt=0)  # with min_workers: the most workers an elastic run uses
    # Elastic: start with as many workers as the cluster can place, at least min_workers, and
    # grow back towards num_workers after a failure. The data position is global, so a run that
    # changes worker count neither repeats nor skips sequences.
    min_workers: int | None = Field(None, gt=0)
    # ddp: every worker holds the whole model. fsdp: FSDP2 shards weights, gradients and
    # optimizer state across workers, for models that do not fit one device.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(None, gt=0)  # None: share the cluster's CPUs evenly
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint; -1: no limit
    price_per_hour: float | None = Field(
        None, ge=0
    )  # USD per GPU (or CPU core) hour; None: pipelines/train/cost.py's table


class TrackingSection(Section):
    experiment: str = "raylm"
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else ./mlflow.db
    system_metrics: bool = True  # the driver's machine: CPU, memory, disk, network, GPU (system/*)
    log_model: bool = True  # the trained model as model/ in Hugging Face format
    register_model: str | None = None  # also a new version of this registered model


class ReplicaSection(Section):
    """Evaluation's scoring replicas: Ray Data actors, each loading the checkpoint once."""

    # None: one GPU each when the Ray cluster has (or its GPU group reaches) GPUs, else CPU
    # replicas. A fraction shares a GPU between replicas.
    gpus_per_replica: float | None = Field(None, ge=0)
    cpus_per_replica: int | None = Field(None, gt=0)  # a CPU replica's threads; None: 1-4 by the cluster's CPUs
    replicas: int | None = Field(None, gt=0)  # the most replicas; None: as many as the cluster reaches
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a GPU, fp32 on CPU
    batch_windows: int | None = Field(None, gt=0)  # windows per forward pass; None: 32 on CPU, from GPU memory


class SideReplicaSection(ReplicaSection):
    """Replicas beside training: one, on a CPU, unless set (a key left out keeps this default)."""

    gpus_per_replica: float | None = Field(0, ge=0)
    replicas: int | None = Field(1, gt=0)


class DuringTrainingSection(Section):
    """Tasks scored on each whole checkpoint while training goes on (`raylm run`, `pretrain`,
    `finetune`): a follow-evaluator beside the training workers, on replicas of its own, logging
    task/<name>/<metric> at the checkpoint's step to the training run. Training never waits for
    it; the run ends once it has scored the last checkpoint."""

    tasks: list[str] = []  # task YAML files, over eval.task_data_dir; empty: off
    every: int = Field(1, gt=0)  # every Nth checkpoint of the launch; the last one always
    # On a GPU cluster whose GPUs training holds, gpus_per_replica: 1 needs GPUs beyond them
    # (cluster render counts them into the GPU group).
    resources: SideReplicaSection = SideReplicaSection()


class EvalSection(ReplicaSection):
    # Validation tokens scored at the end of a run and per checkpoint by --follow, drawn from
    # every shard of the split; None: all of it. 4M tokens (4,096 windows of 1,024): about 4 s
    # of one H100 at 124M and 3 min at 7B (2 forward FLOPs a parameter a token at 30% of its
    # 989 TFLOP/s), where a 1B run's 200M-token split needs an estimated 44 h of 60 CPU cores;
    # the mean's standard error is 1/64 of the per-window spread.
    max_tokens: int | None = Field(4_194_304, gt=0)
    # Whether `raylm evaluate` alone scores the validation split: auto when this config's
    # prepared data is there (a checkpoint from elsewhere is scored on its tasks and texts only);
    # always: its absence is an error; never. `raylm run` and `finetune` always score it.
    validation: Literal["auto", "always", "never"] = "auto"
    sample_prompt: str = ""  # empty: sample a fresh document after the EOS token
    sample_tokens: int = Field(120, ge=0)
    temperature: float = Field(0.8, ge=0)
    top_k: int | None = Field(50, gt=0)
    # Tasks (pipelines/eval/tasks.py): YAML files such as configs/tasks/arc_easy.yaml, over JSONL
    # files under task_data_dir (e.g. ../shared/data); scored after the validation split.
    tasks: list[str] = []
    task_data_dir: LocalPath | None = None  # a local folder
    task_limit: int | None = Field(None, gt=0)  # the first N examples of each task (quick checks)
    texts: list[LocalPath] = []  # local UTF-8 text files also scored for loss, perplexity and bits per byte
    during_training: DuringTrainingSection = DuringTrainingSection()

    @model_validator(mode="after")
    def _tasks_have_data(self) -> EvalSection:
        for key, tasks in (("eval.tasks", self.tasks), ("eval.during_training.tasks", self.during_training.tasks)):
            if tasks and not self.task_data_dir:
                raise ValueError(f"{key} needs eval.task_data_dir (or --data-dir): the folder their paths are under")
        return self


class SftSourceSection(Section):
    """JSONL instruction data. auto: by the row's keys (messages; question/answer = GSM8K;
    instances = self-instruct; instruction/response or /output = Dolly, Alpaca); else the
    prompt_field/response_field pair."""

    paths: list[str] = Field(min_length=1)
    name: str | None = None
    format: Literal["auto", "prompt_response", "messages", "gsm8k", "dolly", "self_instruct"] = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    limit: int | None = Field(None, gt=0)  # the first N examples


class TemplateSection(Section):
    """How turns become text. The loss counts only the assistant's text (and the EOS after
    it); a plain-text template needs no new tokens, so any base tokenizer works."""

    system: str = "{content}\n\n"
    user: str = "### Instruction:\n{content}\n\n"
    assistant: str = "### Response:\n{content}"

    @model_validator(mode="after")
    def _placeholders(self) -> TemplateSection:
        for role in ("system", "user", "assistant"):
            if getattr(self, role).count("{content}") != 1:
                raise ValueError(f"{role} must contain {{content}} exactly once")
        return self


class SftSection(Section):
    sources: list[SftSourceSection] = []
    template: TemplateSection = TemplateSection()
    val_fraction: float = Field(0.05, gt=0, lt=1)  # validation loss on held-out responses
    pack: bool = True  # several examples per window, each attending only to itself


class LoraSection(Section):
    enabled: bool = False
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / rank
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[Literal["wq", "wk", "wv", "wo", "w1", "w2", "w3"]] = Field(["wq", "wv"], min_length=1)


class FinetuneSection(Section):
    # A raylm checkpoint or model directory (model.json), or a Hugging Face Llama directory
    # (config.json + safetensors), which is imported first; a local path. The model section is not
    # used: the shape is the base's.
    base: LocalPath | None = None
    # sft: instruction data from sft.sources. cpt: continued pretraining on the data section's
    # corpus, tokenized with the base model's tokenizer.
    mode: Literal["sft", "cpt"] = "sft"
    sft: SftSection = SftSection()
    lora: LoraSection = LoraSection()

    @model_validator(mode="after")
    def _has_data(self) -> FinetuneSection:
        if self.mode == "sft" and self.base and not self.sft.sources:
            raise ValueError("mode sft needs finetune.sft.sources (JSONL instruction data), or use mode cpt")
        return self


class StorageSection(Section):
    """The volume every Ray pod mounts for prepared data and checkpoints: pod-local disk is
    lost with the pod, and a resubmitted job must find its run's checkpoints."""

    # A ReadWriteMany PersistentVolumeClaim: NFS / Filestore / EFS, or an s3:// or gs:// bucket
    # exposed by its CSI driver (Mountpoint for S3, Cloud Storage FUSE); cluster/README.md.
    claim: str = Field("raylm-runs", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    mount_path: str = Field("/mnt/raylm", pattern=r"^/")
    size_gib: int = Field(1000, gt=0)  # `raylm cluster render --platform` creates the claim with this size
    storage_class: str | None = None  # a ReadWriteMany class (e.g. filestore, efs-sc); None: the cluster default


class GpuGroupSection(Section):
    """The GPU worker group: one Ray Train worker per GPU, whole nodes of gpus_per_node."""

    type: str = "H100"  # names the price and peak in pipelines/train/cost.py
    gpus_per_node: int = Field(8, gt=0)
    cpus_per_gpu: int = Field(8, gt=0)  # for the worker's data loading and Ray Data tasks placed beside it
    memory_gib_per_gpu: int = Field(100, gt=0)  # host memory; an 8 x H100 node has 1-2 TiB
    max_nodes: int | None = Field(None, gt=0)  # None: enough nodes for scaling.num_workers GPUs
    # Node labels of the GPU pool. Default: the label NVIDIA GPU feature discovery puts on
    # H100 SXM nodes; on GKE use {cloud.google.com/gke-accelerator: nvidia-h100-80gb}.
    node_selector: dict[str, str] = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    spot: bool = False  # schedule on spot / preemptible nodes (needs scaling.max_failures != 0)
    # Labels and taint key of spot nodes: GKE's default; EKS uses eks.amazonaws.com/capacityType: SPOT.
    spot_node_selector: dict[str, str] = {"cloud.google.com/gke-spot": "true"}


class CpuGroupSection(Section):
    """CPU-only workers for Ray Data (prepare, streaming packing, evaluation)."""

    max_nodes: int = Field(4, ge=0)
    cpus: int = Field(16, gt=0)
    memory_gib: int = Field(64, gt=0)


class ClusterSection(Section):
    """How `raylm cluster render` lays the job out on Kubernetes (KubeRay); see cluster/README.md.
    Local runs ignore this section."""

    name: str | None = Field(None, pattern=r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")  # None: from run.name
    namespace: str = Field("raylm", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    # Built from ./Dockerfile and pushed to your registry; a tag or digest, never :latest.
    image: str = "ghcr.io/raylm/raylm:0.1.0-ray2.60.0"
    head_cpus: int = Field(4, gt=0)  # the head runs the driver and the autoscaler, no tasks (num-cpus 0)
    head_memory_gib: int = Field(16, gt=0)
    gpu: GpuGroupSection = GpuGroupSection()
    cpu: CpuGroupSection = CpuGroupSection()
    storage: StorageSection = StorageSection()
    mlflow_uri: str = "http://mlflow:5000"  # the in-cluster MLflow Service (cluster/mlflow.yaml)
    # Where the MLflow server keeps artifacts (models, plots); its runs live in PostgreSQL,
    # whose URI the server reads from the Secret mlflow-db (key uri).
    mlflow_artifacts: str = Field("s3://raylm-mlflow/artifacts", pattern=r"^(s3|gs)://")
    operator_namespace: str = "kuberay-system"  # the KubeRay operator polls job status on the dashboard port
    # Secrets whose keys become environment variables in every Ray pod: cloud credentials for
    # s3:// gs:// hf:// data (AWS_ACCESS_KEY_ID, HF_TOKEN, ...). Names only; never values.
    secrets: list[str] = ["raylm-credentials"]
    shm_gib: int = Field(
        32, gt=0
    )  # /dev/shm for Ray's object store and DataLoader workers (Docker's default is 64 MiB)
    idle_timeout_seconds: int = Field(300, gt=0)  # an idle worker pod is removed after this
    ttl_seconds_after_finished: int = Field(3600, ge=0)  # RayJob: keep the finished cluster's logs this long
    active_deadline_seconds: int = Field(7 * 86400, gt=0)  # RayJob: fail (and stop paying) after this
    backoff_limit: int = Field(2, ge=0)  # RayJob: resubmissions after a failure; each resumes the run
    # Seconds a stopping driver has to finish its step, checkpoint and end its MLflow run: the
    # head pod's terminationGracePeriodSeconds (an eviction; its preStop hook signals the driver)
    # and `ray job stop`'s wait before SIGKILL. Seconds for a small model; a 7B model's ~84 GB
    # of weights and AdamW state on a network volume take minutes.
    stop_grace_seconds: int = Field(300, ge=30)


class RaylmConfig(Section):
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    tokenizer: TokenizerSection = TokenizerSection()
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    scaling: ScalingSection = ScalingSection()
    tracking: TrackingSection = TrackingSection()
    eval: EvalSection = EvalSection()
    finetune: FinetuneSection = FinetuneSection()
    cluster: ClusterSection = ClusterSection()

    @model_validator(mode="after")
    def _sections_agree(self) -> RaylmConfig:
        if self.data.seq_len > self.model.block_size:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.block_size={self.model.block_size}")
        self._batch_from_tokens()
        self._batch_divides()
        return self

    def _batch_divides(self) -> None:
        """Every worker count the run may use must split the global batch into whole micro-batches."""
        s = self.scaling
        if s.min_workers and s.min_workers > s.num_workers:
            raise ValueError(f"scaling.min_workers={s.min_workers} exceeds scaling.num_workers={s.num_workers}")
        for workers in range(s.min_workers or s.num_workers, s.num_workers + 1):
            per_step = self.train.micro_batch_size * workers
            if self.train.batch_size % per_step:
                raise ValueError(
                    f"train.batch_size={self.train.batch_size} must be a multiple of "
                    f"train.micro_batch_size x scaling.num_workers = {per_step}"
                    + (
                        f" (with {workers} of the elastic {s.min_workers}-{s.num_workers} workers)"
                        if s.min_workers
                        else ""
                    )
                )

    def _batch_from_tokens(self) -> None:
        tokens, seq_len = self.train.batch_tokens, self.data.seq_len
        if tokens is None:
            return
        if "batch_size" in self.train.model_fields_set:
            raise ValueError("give train.batch_size or train.batch_tokens, not both")
        if tokens % seq_len:
            raise ValueError(f"train.batch_tokens={tokens} must be a multiple of data.seq_len={seq_len}")
        self.train.batch_size = tokens // seq_len

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """{"model.n_layer": 4, ...}: the form MLflow params and Tune search spaces use."""
        return flatten(self.model_dump(mode="json"))


def section_fingerprint(*sections: BaseModel) -> str:
    blob = json.dumps([s.model_dump(mode="json") for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RaylmConfig:
    return validate(load_raw(path, overrides), str(path or "defaults"))


def load_raw(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """The config tree as written (YAML plus overrides), before validation and defaults."""
    raw = _read_yaml(Path(path)) if path else {}
    in_file = copy.deepcopy(raw.get("model")) if isinstance(raw.get("model"), dict) else {}
    set_keys = [_apply_override(raw, item) for item in overrides]
    _check_preset_override(in_file, raw, set_keys, str(path))
    return raw


SHAPE_FIELDS = tuple(dict.fromkeys(k for shape in PRESETS.values() for k in shape))  # what a preset sets


def _check_preset_override(in_file: dict, raw: dict, set_keys: list[str], path: str) -> None:
    """`--set model.preset=124m` on a file whose model section gives its own shape (n_layer: 4, ...)
    would lose to those fields, as fields beside a preset do (ModelSection), and train the file's
    model under the preset's name. Shape fields --set as well win; a file naming that same preset
    keeps its fields beside it."""
    preset = (raw.get("model") or {}).get("preset") if isinstance(raw.get("model"), dict) else None
    if "model.preset" not in set_keys or preset not in PRESETS or in_file.get("preset") == preset:
        return
    shape = {**{k: ModelShape.model_fields[k].default for k in SHAPE_FIELDS}, **PRESETS[preset]}
    conflicts = [
        f"model.{k}" for k in SHAPE_FIELDS if k in in_file and f"model.{k}" not in set_keys and in_file[k] != shape[k]
    ]
    if conflicts:
        raise ConfigError(
            f"--set model.preset={preset} conflicts with {', '.join(conflicts)} set in {path}, which would win "
            f"over the preset's shape: remove them from the file or --set them too"
        )


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def _apply_override(raw: dict, item: str) -> str:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key.path=value, got {item!r}")
    set_key(raw, key.strip(), _parse_value(text), "--set ")
    return key.strip()


def set_key(raw: dict, key: str, value: Any, origin: str = "") -> None:
    """raw["a"]["b"] = value for key "a.b" (creating sections); `origin` prefixes errors."""
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):  # data.sources.0.weight
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{origin}{key}: {'.'.join(parents[:i])} is not a section")
    if not isinstance(node, dict):
        raise ConfigError(f"{origin}{key}: {'.'.join(parents)} is not a section")
    node[leaf] = value


def validate(raw: dict, source: str) -> RaylmConfig:
    """The typed config for a raw tree, or a ConfigError naming every bad key path."""
    try:
        return RaylmConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe(err, source=source)) from None


def field_problems(raw: dict, key: str) -> list[str]:
    """What is wrong with the value at `key` itself (unknown key, wrong type, out of range),
    leaving out checks that involve other keys (e.g. n_head must divide n_embd)."""
    try:
        RaylmConfig.model_validate(raw)
    except ValidationError as err:
        return [
            _describe_one(e)
            for e in err.errors()
            if ".".join(str(p) for p in e["loc"]) == key and e["type"] != "value_error"
        ]
    return []


def _parse_value(text: str) -> Any:
    # YAML typing (numbers, booleans, [lists]); a string such as "3e-4" (YAML 1.1 needs a dot)
    # is left to pydantic, which reads it as a number where the field is one.
    return yaml.safe_load(text) if text.strip() else ""


def describe(err: ValidationError, source: str) -> str:
    """One line naming every key path a validation error found, for a ConfigError."""
    return f"invalid config ({source}): " + "; ".join(_describe_one(e) for e in err.errors())


def _describe_one(e: dict) -> str:
    path = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"unknown key {path}{_suggestion(e['loc'])}"
    if e["type"] == "value_error":  # a cross-field check; its message names the keys
        return f"{path}: {msg}" if path else msg
    return f"{path}: {msg} (got {e['input']!r})"


def _suggestion(loc: tuple) -> str:
    section: type[BaseModel] = RaylmConfig
    for part in loc[:-1]:
        if isinstance(part, int):  # an index into a list of sections, e.g. data.sources.0
            continue
        field = section.model_fields.get(str(part))
        kind = field.annotation if field else None
        if get_origin(kind) is list:
            kind = get_args(kind)[0]
        elif get_origin(kind) is UnionType:  # an optional section, e.g. model.rope_scaling
            kind = next(arg for arg in get_args(kind) if arg is not type(None))
        if not (isinstance(kind, type) and issubclass(kind, BaseModel)):
            return ""
        section = kind
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1)
    return f" (did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))}?)" if close else ""


def walk(tree: dict | list, prefix: str = "", lists: bool = True) -> Iterator[tuple[str, Any]]:
    """(dotted key path, value) for every node under `tree`, each before what it holds:
    "data.sources", "data.sources.0", "data.sources.0.paths", "data.sources.0.paths.0", ...
    List items are numbered; with lists=False a list is a value and its items are not visited."""
    for key, value in enumerate(tree) if isinstance(tree, list) else tree.items():
        path = f"{prefix}{key}"
        yield path, value
        if isinstance(value, dict) or (lists and isinstance(value, list)):
            yield from walk(value, f"{path}.", lists)


def flatten(tree: dict) -> dict[str, Any]:
    """Every value that is not a mapping, by its dotted key path; a list is one value."""
    return {path: value for path, value in walk(tree, lists=False) if not isinstance(value, dict)}
