"""The training loop each Ray Train worker runs. Read `train_loop_per_worker` top to bottom;
the pieces it calls (optimizer, loader, checkpoint, metrics) live in their own modules."""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raylm.models import GPT

from .checkpoint import load_checkpoint, save_checkpoint
from .loader import StreamLoader, WindowLoader, read_windows
from .optim import lr_at, make_optimizer, set_lr
from .scoring import score_windows, summarize
from .tokenizer import load_tokenizer, token_byte_lengths
from .tracking import MetricSink


def train_loop_per_worker(job: dict) -> None:
    """job: {"model": ModelConfig, "train": TrainSection, "data_dir": str, "seq_len": int,
    "streaming": bool, "seed": int, "tracking": {"uri", "run_id"}}, built by pretrain.py."""
    # Ray Train logs every report at INFO ("Reporting training result ..."); raylm prints
    # its own progress lines, so keep worker logs to warnings.
    logging.getLogger().setLevel(logging.WARNING)
    cfg, data_dir = job["train"], Path(job["data_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(job["seed"])  # identical initial weights on every rank
    model = GPT(job["model"]).to(device)
    optimizer = make_optimizer(model, cfg)
    loader = make_loader(job, rank, world)
    start_step = restore(model, optimizer, loader)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)
    validator = Validator(data_dir, cfg.eval_windows, rank, world, device)
    accum = cfg.batch_size // (cfg.micro_batch_size * world)
    tokens_per_step = cfg.batch_size * job["seq_len"]
    log = StepLog(rank, job["tracking"], cfg, tokens_per_step, start_step)

    try:
        for step in range(start_step, cfg.max_steps):
            lr = lr_at(step, cfg)
            set_lr(optimizer, lr)
            loss, grad_norm = train_step(ddp_model, optimizer, loader, accum, cfg.grad_clip, device)
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step + 1}; no checkpoint written for this state")
            done = step + 1
            log.step(done, {"train_loss": loss, "lr": lr, "grad_norm": grad_norm})
            if done % cfg.eval_interval == 0 or done == cfg.max_steps:
                log.eval(done, validator.run(model))
                log.reset_clock()
            if done % cfg.checkpoint_interval == 0 or done == cfg.max_steps:
                report_checkpoint(done, model, optimizer, loader, data_dir / "tokenizer.json", log.latest)
                log.reset_clock()
    finally:
        log.close()  # deliver the metrics of the last interval even when a step raised


def make_loader(job: dict, rank: int, world: int):
    """Batches from the prepared shards (global order, exact resume) or, in streaming mode,
    from the Ray Data stream handed to TorchTrainer as dataset "train"."""
    micro = job["train"].micro_batch_size
    if job["streaming"]:
        return StreamLoader(ray.train.get_dataset_shard("train"), micro, world)
    return WindowLoader(read_windows(Path(job["data_dir"]) / "train"), micro, rank, world, job["seed"])


def train_step(model, optimizer, loader: WindowLoader, accum: int, grad_clip: float, device) -> tuple[float, float]:
    """One optimizer step over `accum` micro-batches; returns the global mean loss and grad norm."""
    total = torch.zeros((), device=device)
    for micro in range(accum):
        x, y = (t.to(device) for t in loader.next_batch())
        # DDP all-reduces gradients on every backward unless told not to: only on the last one.
        sync = micro == accum - 1 or not hasattr(model, "no_sync")
        with nullcontext() if sync else model.no_sync():
            _, loss = model(x, y)
            (loss / accum).backward()
        total += loss.detach() / accum
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return _mean_over_ranks(total), float(grad_norm)


def _mean_over_ranks(value: torch.Tensor) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return float(value)


class Validator:
    """Scores the first `n` validation windows, split across ranks, summed over all of them."""

    def __init__(self, data_dir: Path, n: int, rank: int, world: int, device):
        windows = read_windows(data_dir / "val")[:n]
        self.windows = torch.from_numpy(windows[rank::world].astype(np.int64)).to(device)
        self.token_bytes = torch.from_numpy(token_byte_lengths(load_tokenizer(data_dir / "tokenizer.json"))).to(device)

    def run(self, model: GPT, batch: int = 16) -> dict[str, float]:
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.windows.device)
        for i in range(0, len(self.windows), batch):
            s = score_windows(model, self.windows[i : i + batch], self.token_bytes)
            totals += torch.stack([s["nats"].sum(), s["tokens"].sum(), s["bytes"].sum()])
        model.train()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        return {f"val_{k}": v for k, v in summarize(*totals.tolist()).items()}


def restore(model: GPT, optimizer, loader: WindowLoader) -> int:
    """Resume from the checkpoint Ray Train hands us (after a failure or on relaunch)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(Path(directory), model, optimizer)
    loader.load_state_dict(state["loader"])
    print(f"[train] resumed from {checkpoint.path} at step {state['step']}")
    return int(state["step"])


def report_checkpoint(step: int, model: GPT, optimizer, loader: WindowLoader, tokenizer: Path, metrics: dict) -> None:
    """Every rank reports (Ray Train's barrier); rank 0 alone writes, since DDP ranks are equal."""
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            state = {"step": step, "loader": loader.state_dict()}
            save_checkpoint(Path(tmp), model, optimizer, state, tokenizer)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({**metrics, "step": step}, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:06d}")


class StepLog:
    """Rank 0: metrics to MLflow every step (sent in batches), one progress line per interval."""

    def __init__(self, rank: int, tracking: dict, cfg, tokens_per_step: int, start_step: int):
        self.active, self.cfg, self.tokens_per_step = rank == 0, cfg, tokens_per_step
        self.sink = MetricSink(tracking["uri"], tracking["run_id"]) if self.active and tracking else None
        self.latest: dict[str, float] = {}
        self._clock, self._clock_step = time.perf_counter(), start_step

    def step(self, step: int, metrics: dict[str, float]) -> None:
        self._record(metrics, step)
        if self.active and (step % self.cfg.log_interval == 0 or step == self.cfg.max_steps):
            self._progress(step)

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        self._record(metrics, step)
        if self.active:
            print(f"[train] step {step} | val loss {metrics['val_loss']:.4f} | "
                  f"val bits/byte {metrics['val_bits_per_byte']:.4f}", flush=True)

    def reset_clock(self) -> None:
        """Keep evaluation and checkpoint time out of the next interval's tokens/s."""
        self._clock = time.perf_counter()

    def close(self) -> None:
        if self.sink:
            self.sink.close()

    def _record(self, metrics: dict[str, float], step: int) -> None:
        self.latest.update(metrics)
        if self.sink:
            self.sink.add(metrics, step)

    def _progress(self, step: int) -> None:
        now = time.perf_counter()
        steps, elapsed = step - self._clock_step, max(now - self._clock, 1e-9)
        tok_s = steps * self.tokens_per_step / elapsed
        eta = (self.cfg.max_steps - step) * elapsed / max(steps, 1)
        self._record({"tokens_per_s": tok_s, "tokens_seen": step * self.tokens_per_step}, step)
        if self.sink:
            self.sink.flush()
        print(f"[train] step {step}/{self.cfg.max_steps} | loss {self.latest['train_loss']:.4f} | "
              f"lr {self.latest['lr']:.2e} | {tok_s:,.0f} tok/s | eta {eta:.0f}s", flush=True)
        self._clock, self._clock_step = now, step
