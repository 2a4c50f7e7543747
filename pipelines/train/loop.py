"""The training loop each Ray Train worker runs. Read `train_loop_per_worker` top to bottom;
the pieces it calls (optimizer, loader, checkpoint, metrics) live in their own modules."""

from __future__ import annotations

import logging
import math
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raylm.config import TrainSection
from raylm.fmt import money
from raylm.models import GPT
from raylm.models.lora import apply_lora
from raylm.pipelines.data.loader import BatchSource, StreamLoader, WindowLoader, WindowStore
from raylm.pipelines.data.tokenizer import load_tokenizer, token_byte_lengths
from raylm.pipelines.eval.scoring import score_windows, summarize
from raylm.pipelines.track.tracking import MetricSink
from raylm.pipelines.train.checkpoint import Save, checkpoint_name, load_checkpoint, usable_checkpoint
from raylm.pipelines.train.cost import EXPECTED_MFU, CostMeter, Estimate, budget_reason, detect_hardware, planned_tokens
from raylm.pipelines.train.interrupt import StopWatch
from raylm.pipelines.train.job import TrainJob
from raylm.pipelines.train.optim import lr_at, make_optimizer, set_lr
from raylm.pipelines.train.parallelize import autocast, parallelize
from raylm.pipelines.train.step import train_step
from raylm.storage import Location, locate


def train_loop_per_worker(config: dict) -> None:
    """config: {"job": TrainJob}, the train_loop_config pretrain.py hands to TorchTrainer."""
    job: TrainJob = config["job"]
    # Ray Train logs every report at INFO ("Reporting training result ..."); raylm prints
    # its own progress lines, so keep worker logs to warnings.
    logging.getLogger().setLevel(logging.WARNING)
    train, scaling, data_dir = job.train, job.scaling, Path(job.data_dir)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(job.seed)  # the same dropout and LoRA draws on every rank
    model = build_model(job)
    trained = parallelize(
        model, scaling.strategy, device, job.seed, train.activation_checkpointing, train.compile, job.init
    )
    optimizer = make_optimizer(model, train)
    loader = make_loader(job, rank, world)
    resumed = restore(model, optimizer, loader, job, world)
    validator = Validator(data_dir, train.eval_windows, rank, world, device)
    accum = train.batch_size // (train.micro_batch_size * world)
    tokens_per_step = train.batch_size * job.seq_len
    hardware = detect_hardware(scaling.use_gpu, world, job.cpus_per_worker, scaling.price_per_hour)
    meter = CostMeter(hardware, job.flops_per_token, tokens_per_step, train.max_steps)
    if train.max_usd and hardware.price_per_hour is None:
        raise ValueError(
            f"train.max_usd needs a price and none is known for {hardware.name}: set scaling.price_per_hour"
        )
    log = StepLog(rank, job.tracking, train, meter, resumed)
    log.expect(meter.estimate(planned_tokens(train, job.seq_len)))
    watch = StopWatch(job.stop if rank == 0 else None)

    # A relaunch of a run whose budget is already spent (the same on every rank: the step and
    # the seconds come from the checkpoint) trains nothing more.
    spent = (
        spent_budget(train, resumed["step"] * tokens_per_step, resumed["train_seconds"], meter)
        if resumed["step"]
        else None
    )
    if spent:
        log.note(f"nothing to train: {spent} at step {resumed['step']}")
        log.close()
        return
    skipped = 0  # steps in a row not applied for a non-finite gradient
    saver = Saver(job, model, optimizer, device)
    try:
        for step in range(resumed["step"], train.max_steps):
            lr = lr_at(step, train)
            set_lr(optimizer, lr)
            local_loss, grad_norm, data_wait = train_step(trained, optimizer, loader, accum, train.grad_clip, device)
            done = step + 1
            wanted = watch.requested() or spent_budget(train, done * tokens_per_step, log.elapsed(), meter)
            loss, stop = reduce_step(local_loss, wanted is not None)
            skipped = skipped + 1 if check_step(done, loss, grad_norm, train, skipped) else 0
            if skipped:
                log.note(f"step {done} not applied: gradient norm {grad_norm}, loss {loss} (train.on_nonfinite=skip)")
            log.step(done, {"train_loss": loss, "lr": lr, "grad_norm": grad_norm}, data_wait)
            last = done == train.max_steps or stop
            if done % train.eval_interval == 0 or last:
                log.eval(done, validator.run(model))
                log.after_pause()
            if done % train.checkpoint_interval == 0 or last:
                state = {"step": done, "loader": loader.state_dict(), "train_seconds": log.elapsed(), "workers": world}
                report = {
                    **log.latest,
                    **spent_so_far(done * tokens_per_step, job.flops_per_token, log.elapsed(), meter),
                }
                log.deliver()  # steps up to this checkpoint are in MLflow before it exists
                saver.save(state, report)
                log.after_pause()
            else:
                saver.report_if_written()
            if stop:
                log.note(f"stopped at step {done}: {wanted or 'another rank reached a time or cost budget'}")
                break
        saver.report_pending()
        log.against_estimate()
        # Every rank: under FSDP the ranks should peak alike (benchmarks/train_state_ray.py).
        print(f"[train] rank {rank} of {world}: peak memory {peak_memory_gb() * 1e3:,.0f} MB", flush=True)
    finally:
        saver.abandon()  # a step raised: a background write in flight is not reported
        log.close()  # deliver the metrics of the last interval even when a step raised


def build_model(job: TrainJob) -> GPT:
    """The model on the meta device: parallelize allocates each rank's shard and fills it
    (drawn, or read from the fine-tuning base). LoRA adapters, if configured, wrap its linear
    layers and freeze the rest (before parallelize, which sees a plain module)."""
    with torch.device("meta"):
        model = GPT(job.model)
        return apply_lora(model, job.lora) if job.lora else model


def make_loader(job: TrainJob, rank: int, world: int) -> BatchSource:
    """Batches from the prepared shards, memory-mapped (global order, exact resume), or in
    streaming mode from the Ray Data stream handed to TorchTrainer as dataset "train"."""
    micro = job.train.micro_batch_size
    if job.streaming:
        return StreamLoader(ray.train.get_dataset_shard("train"), micro, world)
    return WindowLoader(WindowStore.open(Path(job.data_dir) / "train"), micro, rank, world, job.seed)


def check_step(step: int, loss: float, grad_norm: float, train: TrainSection, skipped: int) -> bool:
    """Whether the step was skipped (its gradient norm is inf or NaN, so train_step did not
    apply it); raises when train.on_nonfinite is "fail" or the skips in a row reach
    train.max_skipped_steps. Either way no checkpoint ever holds a non-finite update."""
    if math.isfinite(grad_norm):
        if not math.isfinite(loss):  # a loss overflow in the reduction alone; the update was finite
            raise FloatingPointError(f"loss is {loss} at step {step}; no checkpoint written for this state")
        return False
    what = f"gradient norm is {grad_norm} at step {step} (loss {loss}): the step was not applied"
    if train.on_nonfinite == "fail":
        raise FloatingPointError(f"{what}; the last checkpoint is the newest state (train.on_nonfinite=fail)")
    if skipped + 1 >= train.max_skipped_steps:
        raise FloatingPointError(f"{what}, {skipped + 1} steps in a row (train.max_skipped_steps)")
    return True


def spent_budget(train: TrainSection, tokens: int, seconds: float, meter: CostMeter) -> str | None:
    """The budget spent at this step, if any. Tokens agree on every rank; clocks differ a
    little, so a time or dollar budget stops all ranks as soon as one of them sees it spent."""
    return budget_reason(tokens, seconds, meter.usd(seconds), train.max_tokens, train.max_hours, train.max_usd)


def spent_so_far(tokens: int, flops_per_token: int, seconds: float, meter: CostMeter) -> dict[str, float]:
    """The compute a report carries, for budgets counted outside the run (a Tune sweep's)."""
    usd = meter.usd(seconds)
    return {
        "tokens_seen": tokens,
        "flops_seen": float(tokens * flops_per_token),
        "train_seconds": seconds,
        **({"cost_usd": usd} if usd is not None else {}),
    }


def reduce_step(loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
    """One all-reduce per step carries both the loss (averaged over ranks, for logging) and
    whether any rank must stop (a SIGTERM, a budget), so that all ranks stop at the same step."""
    packed = torch.stack([loss.float(), torch.tensor(float(stop), device=loss.device)])
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(packed)
    return float(packed[0]) / world, bool(packed[1] > 0)


class Validator:
    """Scores the first `n` validation windows, split across ranks, summed over all of them."""

    def __init__(self, data_dir: Path, n: int, rank: int, world: int, device):
        windows = WindowStore.open(data_dir / "val").head(n)  # reads n windows, not the split
        self.windows = torch.from_numpy(windows[rank::world].astype(np.int64)).to(device)
        self.token_bytes = torch.from_numpy(token_byte_lengths(load_tokenizer(data_dir / "tokenizer.json"))).to(device)

    def run(self, model: GPT, batch: int = 16) -> dict[str, float]:
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.windows.device)
        for i in range(0, len(self.windows), batch):
            with autocast(self.windows.device):
                s = score_windows(model, self.windows[i : i + batch], self.token_bytes)
            totals += torch.stack([s["nats"].sum(), s["tokens"].sum(), s["bytes"].sum()])
        model.train()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        return {f"val_{k}": v for k, v in summarize(*totals.tolist()).items()}


def restore(model: GPT, optimizer, loader: BatchSource, job: TrainJob, world: int) -> dict:
    """Resume from the checkpoint Ray Train hands us (after a failure or on relaunch), else
    from --resume; returns the loop state: step and training seconds so far (zeros if fresh)."""
    own = ray.train.get_checkpoint()
    if own is None and job.resume is None:
        return {"step": 0, "train_seconds": 0.0}
    # Read where it lies (a volume or object storage), never copied whole to this worker first.
    where = Location.on(own.filesystem, own.path) if own else locate(job.resume)
    usable = usable_checkpoint(where, later=own is not None)
    if usable is None:
        print(f"[train] no whole checkpoint at or before {where}: starting from step 0", flush=True)
        return {"step": 0, "train_seconds": 0.0}
    state = load_checkpoint(usable, model, optimizer, job.base)
    loader.load_state_dict(state["loader"])
    # The data position is global: another worker count picks up at the same sequence.
    was = f" (saved by {state['workers']})" if state.get("workers", world) != world else ""
    print(
        f"[train] resumed from {usable} at step {state['step']} with {world} workers{was}; "
        f"this rank read {state['bytes_read']:,} of the {state['bytes_stored']:,} shard bytes",
        flush=True,
    )
    return {"step": int(state["step"]), "train_seconds": float(state.get("train_seconds", 0.0))}


class Saver:
    """Checkpoints at the loop's request. Every rank writes its shard of the state into a
    directory of its own and reports it: Ray Train uploads them all into one checkpoint
    directory (report is also its barrier). With train.async_save the step waits only while the
    state is copied to host memory; the files are written in the background, and the checkpoint
    is reported at the first step boundary where every rank's write is done (a collective check,
    so all ranks report at the same step). A second save waits for the first. Names an earlier
    launch left in the run directory are not reused (checkpoint.checkpoint_name): every rank
    lists them before the first save, so before any rank uploads."""

    def __init__(self, job: TrainJob, model: GPT, optimizer, device: torch.device):
        self.job, self.model, self.optimizer, self.device = job, model, optimizer, device
        self.tokenizer = Path(job.data_dir) / "tokenizer.json"
        self.pending: tuple[Save, dict, Path] | None = None
        self.taken = {p.name for p in job.run_dir.subdirs("checkpoint_*")}

    def save(self, state: dict, metrics: dict) -> None:
        self.report_pending()
        directory = Path(tempfile.mkdtemp(prefix="raylm-checkpoint-"))
        background = self.job.train.async_save
        save = Save(
            directory, self.model, self.optimizer, state, self.tokenizer, self.job.lora, self.job.base, background
        )
        self.pending = (save, {**metrics, "step": state["step"]}, directory)
        if not background:
            self.report_pending()

    def report_if_written(self) -> None:
        if self.pending and self.pending[0].written_everywhere(self.device):
            self.report_pending()

    def abandon(self) -> None:
        if self.pending is not None:
            shutil.rmtree(self.pending[2], ignore_errors=True)
            self.pending = None

    def report_pending(self) -> None:
        if self.pending is None:
            return
        save, metrics, directory = self.pending
        self.pending = None
        try:
            save.finish()
            name = checkpoint_name(metrics["step"], self.taken)
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=name
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)


class StepLog:
    """Rank 0: metrics to MLflow every step (sent in batches), one progress line per interval
    with throughput, MFU and cost. Every rank keeps the clock (budgets need it)."""

    def __init__(self, rank: int, tracking: dict | None, train: TrainSection, meter: CostMeter, resumed: dict):
        self.active, self.train, self.meter = rank == 0, train, meter
        self.sink = MetricSink(tracking["uri"], tracking["run_id"]) if self.active and tracking else None
        self.latest: dict[str, float] = {}
        self._prior, self._started = resumed["train_seconds"], time.perf_counter()
        self._clock, self._clock_step, self._waited = time.perf_counter(), resumed["step"], 0.0
        self._step, self.estimate_usd = resumed["step"], None

    def elapsed(self) -> float:
        """Wall seconds of training so far, earlier launches of this run included (for cost)."""
        return self._prior + time.perf_counter() - self._started

    def step(self, step: int, metrics: dict[str, float], data_wait: float) -> None:
        self._step = step
        self._record(metrics, step)
        self._waited += data_wait
        if self.active and (step % self.train.log_interval == 0 or step == self.train.max_steps):
            self._progress(step)

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        self._record({**metrics, "train_seconds": self.elapsed()}, step)  # loss against wall time
        if self.active:
            print(
                f"[train] step {step} | val loss {metrics['val_loss']:.4f} | "
                f"val bits/byte {metrics['val_bits_per_byte']:.4f}",
                flush=True,
            )

    def expect(self, planned: Estimate | None) -> None:
        """Log `raylm cost`'s pre-launch estimate for the detected hardware, to read the
        actual cost against (the whole run's, so a relaunch logs the same figure again)."""
        self.estimate_usd = planned.usd if planned else None
        if self.estimate_usd is not None:
            self._record({"cost_estimate_usd": self.estimate_usd}, self._step)

    def against_estimate(self) -> None:
        """Actual cost / estimate at the end. Above 1: MFU fell short of EXPECTED_MFU, and the
        actual cost also pays for evaluation and checkpoint time, which the estimate leaves out."""
        actual = self.meter.usd(self.elapsed())
        if not self.estimate_usd or actual is None:
            return
        self._record({"cost_vs_estimate": actual / self.estimate_usd}, self._step)
        self.note(
            f"cost {money(actual)}: {actual / self.estimate_usd:.2f}x the estimate of {money(self.estimate_usd)} "
            f"at {EXPECTED_MFU:.0%} MFU"
        )

    def note(self, text: str) -> None:
        if self.active:
            print(f"[train] {text}", flush=True)

    def after_pause(self) -> None:
        """After an evaluation or a checkpoint: keep its time out of the next interval's
        tokens/s, and send the buffered metrics now (one request, against a save's seconds)."""
        self._clock = time.perf_counter()
        if self.sink:
            self.sink.flush()

    def deliver(self) -> None:
        """Wait until the metrics so far have reached MLflow (not in an outage; bounded)."""
        if self.sink:
            self.sink.deliver()

    def close(self) -> None:
        if self.sink:
            self.sink.close()

    def _record(self, metrics: dict[str, float], step: int) -> None:
        self.latest.update(metrics)
        if self.sink:
            self.sink.add(metrics, step)

    def _progress(self, step: int) -> None:
        now = time.perf_counter()
        steps, seconds = max(step - self._clock_step, 1), max(now - self._clock, 1e-9)
        tok_s = steps * self.meter.tokens_per_step / seconds
        m = {
            "tokens_per_s": tok_s,
            "tokens_seen": step * self.meter.tokens_per_step,
            "step_time_s": seconds / steps,
            "data_wait_s": self._waited / steps,
            "memory_gb": peak_memory_gb(),
            **self.meter.metrics(step, self.elapsed(), tok_s),
        }
        self._record(m, step)
        eta = (self.train.max_steps - step) * seconds / steps
        cost = f" | {money(m['cost_usd'])} of ~{money(m['projected_usd'])}" if "cost_usd" in m else ""
        mfu = f" | MFU {m['mfu']:.1%}" if "mfu" in m else ""
        print(
            f"[train] step {step}/{self.train.max_steps} | loss {self.latest['train_loss']:.4f} | "
            f"lr {self.latest['lr']:.2e} | {tok_s:,.0f} tok/s{mfu} | eta {eta:.0f}s{cost}",
            flush=True,
        )
        self._clock, self._clock_step, self._waited = now, step, 0.0


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by torch, or this process' peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB
