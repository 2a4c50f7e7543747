"""AdamW with decay/no-decay parameter groups, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from raylm.config import TrainSection


def make_optimizer(model: torch.nn.Module, train: TrainSection) -> torch.optim.AdamW:
    # Matrices decay; norms' gains and 1-d tensors do not (decaying a gain towards 0 only hurts).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused CUDA kernel updates every parameter in one launch instead of several per tensor.
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=fused)


def lr_at(step: int, train: TrainSection) -> float:
    """Linear warmup over warmup_steps, then the schedule's decay to lr * min_lr_ratio at max_steps."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.schedule == "wsd":
        decay_start = train.max_steps - max(1, round(train.decay_fraction * train.max_steps))
        progress = max(0, step - decay_start) / max(1, train.max_steps - decay_start)
        return train.lr * (1 - (1 - train.min_lr_ratio) * progress)
    progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return train.lr * (train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
