"""`raylm pretrain`: run the training loop on Ray Train workers (TorchTrainer; DDP or FSDP2)."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import ray

from raylm.config import ModelSection, RunSection, ScalingSection, TrainSection
from raylm.errors import ConfigError, TrainingFailed
from raylm.models import ModelConfig, flops_per_token
from raylm.models.config import planned_model
from raylm.models.io import load_config as load_model_config
from raylm.models.io import weights_digest
from raylm.models.lora import LoraConfig
from raylm.pipelines.data.manifest import Manifest
from raylm.pipelines.data.packing import stream_train_windows
from raylm.pipelines.runtime import cluster_cpus
from raylm.pipelines.train.checkpoint import BaseRef, check_resumable, latest_checkpoint, torn_reason
from raylm.pipelines.train.interrupt import StopRequest, stop_on_sigterm, stop_when_set
from raylm.pipelines.train.job import TrainJob
from raylm.pipelines.train.loop import train_loop_per_worker
from raylm.storage import Location, locate

WORKER_ENV = {
    # Train otherwise re-routes print() through its logger and the line shows twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # The workers' only MLflow client is the metric sink, which holds metrics and retries every
    # 5 s itself. MLflow's own 7 retries with backoff would hold one send for ~2 min and, after
    # an outage, delay delivery by up to 64 s more; its 120 s timeout would let a hung server
    # hold the sender as long.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def build_model_config(section: ModelSection, tokenizer_vocab: int) -> ModelConfig:
    """The model section plus the vocabulary size the prepared data needs."""
    model = planned_model(section, tokenizer_vocab)
    if model.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} tokens"
        )
    return model


def train_storage(run: RunSection) -> Location:
    """Ray Train keeps each run's checkpoints in <checkpoint_dir>/<run name>/: run.checkpoint_dir
    (a path, a volume, s3:// or gs://), by default <output_dir>/train."""
    return locate(run.checkpoint_dir or Path(run.output_dir) / "train")


def pretrain(
    model: ModelConfig,
    train: TrainSection,
    scaling: ScalingSection,
    run: RunSection,
    manifest: Manifest,
    tracking: dict | None,
    resume: str | Path | None = None,
    init: Path | None = None,
    lora: LoraConfig | None = None,
    callbacks: list | None = None,
    stop_event: threading.Event | None = None,
    beside: float = 0.0,
):
    """Train on the prepared data (or, in streaming mode, on windows packed on the fly).
    Returns Ray Train's Result (its .checkpoint is the last one reported) and, if a SIGTERM
    stopped the run early, why. `resume` starts a run with no checkpoints of its own from a
    given checkpoint directory. Fine-tuning passes `init`, the base model directory whose
    weights the workers start from, and `lora` to train adapters instead of every weight.
    A Tune trial passes `callbacks` (Ray Train's TuneReportCallback) to see each report, and
    `stop_event`, set when Tune stops the trial, to stop the workers as a SIGTERM would.
    `beside`: CPUs that an even share of the cluster leaves to work running beside training
    (eval.during_training's scoring replicas)."""
    from ray.data import ExecutionOptions
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchTrainer

    refuse_other_model(run, model)
    storage = train_storage(run)
    start = checked_resume(resume, model) if resume else None
    streaming = manifest.streaming
    cpus = worker_cpus(scaling, streaming, beside)
    job = TrainJob(
        model=model,
        train=train,
        scaling=scaling,
        cpus_per_worker=cpus,
        flops_per_token=flops_per_token(model, manifest.seq_len),
        data_dir=manifest.path,
        seq_len=manifest.seq_len,
        streaming=streaming,
        seed=run.seed,
        tracking=tracking,
        # Train V2 dropped resume_from_checkpoint: the loop loads it when Ray has none of the run's own.
        resume=start,
        stop=StopRequest.remote(),
        init=str(init) if init else None,
        lora=lora,
        base=BaseRef(str(init), weights_digest(init)) if init and lora else None,
        run_dir=storage / run.name,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=(scaling.min_workers, scaling.num_workers) if scaling.min_workers else scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": cpus},
        ),
        datasets={"train": stream_train_windows(manifest)} if streaming else None,
        # In stream order, so a run sees the same windows in the same order every time.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=run.name,
            # Object storage: the driver's FileSystem, pickled with its endpoint (never its keys).
            storage_path=storage.path,
            storage_filesystem=storage.fs if storage.scheme else None,
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # not every report and checkpoint
            worker_runtime_env={"env_vars": WORKER_ENV},
            callbacks=callbacks,
        ),
    )
    try:
        with stop_on_sigterm(job.stop), stop_when_set(stop_event, job.stop, "stopped by the Tune scheduler"):
            result = trainer.fit()
    except TrainingFailedError as err:
        raise TrainingFailed(f"training failed: {_root_cause(err)}") from err
    return result, ray.get(job.stop.reason.remote())


def _root_cause(err: Exception) -> str:
    """The last line of the first worker's error ("FloatingPointError: loss is nan ...")."""
    failures = getattr(err, "worker_failures", None)
    text = str(failures[min(failures)]) if failures else str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else err.__class__.__name__


def refuse_other_model(run: RunSection, model: ModelConfig) -> None:
    """Relaunching a run name resumes its checkpoints (Ray Train restores them); a changed
    model section cannot load them, so say so here instead of failing inside the workers."""
    previous = latest_checkpoint(train_storage(run) / run.name)
    if previous and load_model_config(previous) != model:
        raise ConfigError(
            f"run.name={run.name!r} already has checkpoints of a different model ({previous}); "
            "use the same model section to resume it, or a new run.name"
        )


def checked_resume(path: str | Path, model: ModelConfig) -> Location:
    """--resume: a whole checkpoint of this model (the run's own checkpoints, if any, win),
    a local path or an s3:// gs:// URI."""
    path = locate(path)
    reason = torn_reason(path) if path.is_dir() else "no such directory"
    if reason:
        raise ConfigError(f"--resume: {path} is not a whole checkpoint ({reason})")
    if load_model_config(path) != model:
        raise ConfigError(f"--resume: {path} holds a different model than the model section describes")
    check_resumable(path)  # here, not in the workers: one line instead of a worker traceback
    return path


def worker_cpus(scaling: ScalingSection, streaming: bool = False, beside: float = 0.0) -> float:
    if scaling.cpus_per_worker:
        return scaling.cpus_per_worker
    cpus = cluster_cpus() - beside
    if streaming:  # leave one CPU to the Ray Data stream, or its tasks never get scheduled
        return max(0.25, (cpus - 1) / scaling.num_workers)
    # Share the cluster evenly; at least 1 CPU so torch gets a whole thread per worker.
    share = max(1.0, math.floor(cpus / scaling.num_workers))
    if beside and share * scaling.num_workers > cpus:
        print(
            f"[train] {scaling.num_workers} workers of {share:g} CPUs leave fewer than the {beside:g} CPUs "
            "eval.during_training's replicas take: they wait for free CPUs (set scaling.cpus_per_worker "
            "or eval.during_training.resources)",
            flush=True,
        )
    return share
