"""The hand-off from the driver to the training workers: what each Ray Train worker is given.

pretrain.pretrain builds one `TrainJob` per run and hands it to TorchTrainer as
train_loop_config={"job": job}; Ray pickles it to every worker, where
loop.train_loop_per_worker reads it. Its own module, so both import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from raylm.config import ScalingSection, TrainSection
from raylm.models import ModelConfig
from raylm.models.lora import LoraConfig
from raylm.pipelines.train.checkpoint import BaseRef
from raylm.storage import Location

if TYPE_CHECKING:
    from ray.actor import ActorHandle


@dataclass
class TrainJob:
    """Everything a training worker needs; every field is set by pretrain.pretrain."""

    model: ModelConfig  # the model to build: the model section with the data's vocab, or the base's
    train: TrainSection  # steps, batch, schedule, intervals and budgets: the config's train section
    scaling: ScalingSection  # strategy, GPUs, price per hour: the config's scaling section
    cpus_per_worker: float  # CPUs each worker reserved (worker_cpus), for the CPU cost and MFU
    flops_per_token: int  # training FLOPs per token of `model` at seq_len, for MFU and cost
    data_dir: str  # the prepared-data directory (Manifest.path): train/, val/, tokenizer.json
    seq_len: int  # tokens per window (Manifest.seq_len)
    streaming: bool  # train on the Ray Data stream "train" instead of stored windows (Manifest.streaming)
    seed: int  # run.seed: initial weights and the data order
    tracking: dict[str, str] | None  # {"uri", "run_id"} of the MLflow run to log to; None: no logging
    resume: Location | None = None  # --resume: a checkpoint to start from when Ray Train has none of the run's
    stop: ActorHandle | None = None  # the StopRequest actor rank 0 polls (SIGTERM, Tune stopping the trial)
    init: str | None = None  # fine-tuning: the base model directory whose weights the workers load
    lora: LoraConfig | None = None  # fine-tuning with LoRA: the adapters wrapped around the base's layers
    base: BaseRef | None = None  # LoRA: `init` and its content hash, which checkpoints record instead of its weights
    run_dir: Location | None = None  # where Ray Train puts this run's checkpoints (train_storage / run.name)
