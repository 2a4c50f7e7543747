"""Scoring packed windows: summed next-token loss in nats and the bytes those tokens cover.

Loss per byte, unlike loss per token, compares models across tokenizers (bits per byte, as
The Pile reports it: Gao et al. 2020)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raylm.pipelines.data.loader import as_batch


@torch.no_grad()
def score_windows(model: torch.nn.Module, windows: torch.Tensor, token_bytes: torch.Tensor) -> dict[str, torch.Tensor]:
    """windows (B, seq_len + 1), or fine-tuning windows (B, 3, seq_len + 1) -> per-window nats,
    target tokens and target bytes, each (B,). Fine-tuning windows count response tokens only."""
    x, y, *segments = as_batch(windows)  # (B, T) inputs and next-token targets
    logits, _ = model(x, segments=segments[0] if segments else None)  # (B, T, V)
    nats = F.cross_entropy(logits.transpose(1, 2).float(), y, reduction="none")  # (B, T); 0 where y = -100
    counted = y != -100
    return {
        "nats": nats.sum(dim=1).double(),
        "tokens": counted.sum(dim=1).double(),
        "bytes": torch.where(counted, token_bytes[y.clamp(min=0)], 0).sum(dim=1).double(),
    }


def summarize(nats: float, tokens: float, n_bytes: float) -> dict[str, float]:
    loss = nats / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": nats / math.log(2) / n_bytes}


@torch.no_grad()
def continuation_logliks(
    model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], batch: int = 16
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids) pair: log p(continuation | context) summed over
    the continuation's tokens, and whether greedy decoding would produce exactly those tokens
    (LAMBADA's accuracy). What multiple-choice and cloze tasks compare. A context longer than
    the model's window loses its oldest tokens."""
    window = model.config.block_size + 1  # inputs and the one target beyond them
    out: list[tuple[float, bool]] = []
    for i in range(0, len(pairs), batch):
        rows = [(ctx + cont)[-window:] for ctx, cont in pairs[i : i + batch]]
        width = max(len(r) for r in rows) - 1
        # Right padding: causal attention never lets a real position see the pad after it.
        ids = torch.tensor([r + [0] * (width + 1 - len(r)) for r in rows], device=next(model.parameters()).device)
        logp = torch.log_softmax(model(ids[:, :-1])[0].float(), dim=-1)  # (B, T, V)
        targets = ids[:, 1:]
        token_logp = logp.gather(-1, targets[..., None]).squeeze(-1)  # (B, T): log p(token t+1 | <= t)
        greedy = logp.argmax(-1) == targets  # (B, T)
        for j, (row, (_, cont)) in enumerate(zip(rows, pairs[i : i + batch])):
            span = slice(len(row) - 1 - len(cont), len(row) - 1)  # the continuation's targets
            out.append((float(token_logp[j, span].sum()), bool(greedy[j, span].all())))
    return out
