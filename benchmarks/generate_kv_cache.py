"""Decoding speed with the KV cache against recomputing the whole context for every token
(what raylm did before), side by side in one process; medians of N runs.

Usage: python benchmarks/generate_kv_cache.py [--runs 3] [--new 192] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from raylm.models import GPT, ModelConfig
from raylm.models.generate import generate, pick_next


@torch.no_grad()
def generate_without_cache(model: GPT, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding that runs the full forward pass over the whole context at every step."""
    idx = torch.tensor(prompts)
    for _ in range(max_new_tokens):
        next_id = pick_next(model(idx)[0][:, -1], temperature=0)
        idx = torch.cat([idx, next_id], dim=1)
    return idx[:, len(prompts[0]) :].tolist()


def timed(fn, runs: int) -> tuple[float, list]:
    seconds, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new", type=int, default=192, help="tokens to generate per prompt")
    parser.add_argument("--smoke", action="store_true", help="a 1-layer model, 8 tokens, one run: check that it runs")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, n_layer=6, n_head=8, n_kv_head=2, n_embd=384, block_size=256)
    if args.smoke:
        args.runs, args.new = 1, 8
        cfg = ModelConfig(vocab_size=512, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, block_size=128)
    model = GPT(cfg).eval()
    prompts = torch.randint(0, cfg.vocab_size, (4, 64)).tolist()
    cached_s, cached = timed(lambda: generate(model, prompts, args.new, temperature=0), args.runs)
    full_s, full = timed(lambda: generate_without_cache(model, prompts, args.new), args.runs)
    tokens = len(prompts) * args.new
    print(
        f"model: {cfg.n_layer} layers, {cfg.n_embd} wide, GQA {cfg.n_head}/{cfg.n_kv_head}; batch {len(prompts)}, "
        f"prompt 64, {args.new} new tokens each; median of {args.runs}; same greedy tokens: {cached == full}"
    )
    print(f"{'decoding':28} {'seconds':>8} {'tokens/s':>10} {'ratio':>7}")
    for name, sec in (("full recompute per token", full_s), ("KV cache", cached_s)):
        print(f"{name:28} {sec:8.2f} {tokens / sec:10,.0f} {full_s / sec:6.2f}x")


if __name__ == "__main__":
    main()
