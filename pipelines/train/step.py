"""One optimizer step of the training loop, apart from Ray (benchmarks/gpu_check.py runs it
where Ray is not installed)."""

from __future__ import annotations

import math
import time

import torch

from raylm.pipelines.data.loader import BatchSource
from raylm.pipelines.train.parallelize import autocast, gradient_sync


def train_step(
    model, optimizer, loader: BatchSource, accum: int, grad_clip: float, device
) -> tuple[torch.Tensor, float, float]:
    """One optimizer step over `accum` micro-batches; returns this rank's mean loss (a tensor,
    reduced by the caller), the grad norm, and the seconds spent waiting for batches."""
    total, waited = torch.zeros((), device=device), 0.0
    for micro in range(accum):
        t0 = time.perf_counter()
        x, y, *segments = (t.to(device) for t in loader.next_batch())  # segments: fine-tuning only
        waited += time.perf_counter() - t0
        with gradient_sync(model, enabled=micro == accum - 1):
            with autocast(device):
                _, loss = model(x, y, segments=segments[0] if segments else None)
            (loss / accum).backward()
        total += loss.detach() / accum
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    # The norm is of the reduced gradients (DDP all-reduces them, FSDP2 reduces the sharded
    # norm), so every rank takes the same branch and no collective is left waiting.
    if math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm, waited
