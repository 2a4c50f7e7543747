"""Sampling from a GPT: temperature and top-k over the last position's logits."""

from __future__ import annotations

import torch

from .gpt import GPT


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    stop_token: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend idx (B, T) by up to max_new_tokens; temperature 0 means greedy."""
    model.eval()
    for _ in range(max_new_tokens):
        context = idx[:, -model.config.block_size :]  # RoPE tables stop at block_size
        logits, _ = model(context)
        next_id = pick_next(logits[:, -1, :], temperature, top_k, generator)  # (B, 1)
        idx = torch.cat([idx, next_id], dim=1)
        if stop_token is not None and bool((next_id == stop_token).all()):
            break
    return idx


def pick_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
