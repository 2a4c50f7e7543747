"""Decoding with a KV cache: a batch of prompts, temperature, top-k, top-p and stop tokens.

Prompts of different lengths are left-padded into one batch, so every row decodes in
lockstep; the cache makes each new token cost one position's forward pass instead of the
whole context's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from raylm.models.gpt import GPT, KVCache


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt, up to (not including) its first stop token. Decoding
    ends at max_new_tokens or when the context reaches block_size; temperature 0 is greedy.
    A row also ends once stop(row, its new tokens) is true (stop strings: the caller decodes
    and cuts), so a batch runs until its slowest row, not to the budget."""
    model.eval()
    if not prompts or not all(prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(map(len, prompts))
    budget = min(max_new_tokens, model.config.block_size - width)
    if budget <= 0:
        raise ValueError(f"a prompt of {width} tokens leaves no room in block_size {model.config.block_size}")
    device = model.lm_head.weight.device
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)  # (B, P)
    cache = KVCache(model.config, len(prompts), width + budget, device, model.lm_head.weight.dtype)
    pad = pad if bool(pad.any()) else None  # equal lengths: plain causal attention
    logits = model(idx, cache=cache, pad=pad)[0][:, -1]  # (B, V)
    out, done = [[] for _ in prompts], torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stops = torch.tensor(stop_tokens, dtype=torch.long, device=device)
    for step in range(budget):
        next_id = pick_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
        done |= torch.isin(next_id[:, 0], stops)
        for row, token in enumerate(next_id[:, 0].tolist()):
            if not done[row]:
                out[row].append(token)
                done[row] = bool(stop and stop(row, out[row]))
        if bool(done.all()) or step == budget - 1:
            break
        logits = model(next_id, cache=cache, pad=pad)[0][:, -1]
    return out


def pick_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B, 1) token ids."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        # Nucleus: keep the most likely tokens whose probabilities, before each, sum below top_p.
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the first token always stays
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)
