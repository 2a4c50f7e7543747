"""AdamW with decay/no-decay parameter groups, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from raylm.config import TrainSection


def make_optimizer(model: torch.nn.Module, cfg: TrainSection) -> torch.optim.AdamW:
    # Matrices decay; norms' gains and 1-d tensors do not (decaying a gain towards 0 only hurts).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused CUDA kernel updates every parameter in one launch instead of several per tensor.
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_at(step: int, cfg: TrainSection) -> float:
    """Linear warmup over warmup_steps, then the schedule's decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps - max(1, round(cfg.decay_fraction * cfg.max_steps))
        progress = max(0, step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * progress)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
