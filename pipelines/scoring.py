"""Scoring packed windows: summed next-token loss in nats and the bytes those tokens cover.

Loss per byte, unlike loss per token, compares models across tokenizers (BRIEF sec. 4)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def score_windows(model: torch.nn.Module, windows: torch.Tensor, token_bytes: torch.Tensor) -> dict[str, torch.Tensor]:
    """windows (B, seq_len + 1) -> per-window nats, target tokens and target bytes, each (B,)."""
    x, y = windows[:, :-1], windows[:, 1:]  # (B, T) inputs and next-token targets
    logits, _ = model(x)  # (B, T, V)
    nats = F.cross_entropy(logits.transpose(1, 2).float(), y, reduction="none")  # (B, T)
    return {
        "nats": nats.sum(dim=1).double(),
        "tokens": torch.full((len(y),), y.shape[1], dtype=torch.float64, device=y.device),
        "bytes": token_bytes[y].sum(dim=1).double(),
    }


def summarize(nats: float, tokens: float, n_bytes: float) -> dict[str, float]:
    loss = nats / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": nats / math.log(2) / n_bytes}
