"""The model's shape, its presets, and what it costs: parameter counts and training FLOPs.

No torch here: the CLI validates a config, and the cost model and search (tuning/) size
models, without building one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class ModelConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: = n_head (plain multi-head attention)
    n_embd: int = 128
    block_size: int = 128  # longest context the RoPE tables cover
    ffn_hidden: int | None = None  # None: Llama's rule, see ffn_width()
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (OLMo 2, Qwen3): tames logit growth at high lr

    def __post_init__(self) -> None:
        self.n_kv_head = self.n_kv_head or self.n_head
        checks = {
            "vocab_size": self.vocab_size > 0,
            "n_layer": self.n_layer > 0,
            "n_embd": self.n_embd % self.n_head == 0,
            "n_kv_head": self.n_head % self.n_kv_head == 0,
            "block_size": self.block_size > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid model config ({', '.join(bad)}): {self}")
        if self.head_dim % 2:
            raise ValueError(f"head dim n_embd/n_head = {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def ffn_width(self) -> int:
        """ffn_hidden if given (imported checkpoints need theirs exactly), else Llama's rule:
        2/3 of 4d keeps SwiGLU's three matrices at the cost of a 4d GELU MLP's two, rounded
        up to a multiple of 64 so matmuls tile well."""
        return self.ffn_hidden or 64 * math.ceil(int(2 * 4 * self.n_embd / 3) / 64)

    def to_dict(self) -> dict:
        return asdict(self)


# Shapes only: the vocabulary comes from the tokenizer the data was prepared with. GPT-2/3
# shapes (Radford et al. 2019, Brown et al. 2020 table 2.1) in this Llama-style block; the
# llama-* presets are Llama 3.2 1B/3B and Llama 2 7B as published.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=128),  # tests, seconds on CPU
    "124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "760m": dict(n_layer=24, n_head=16, n_embd=1536, block_size=2048),
    "1.3b": dict(n_layer=24, n_head=16, n_embd=2048, block_size=2048),
    "llama-1b": dict(
        n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, ffn_hidden=8192, block_size=8192, rope_theta=500000.0
    ),
    "llama-3b": dict(
        n_layer=28, n_head=24, n_kv_head=8, n_embd=3072, ffn_hidden=8192, block_size=8192, rope_theta=500000.0
    ),
    "llama-7b": dict(n_layer=32, n_head=32, n_embd=4096, ffn_hidden=11008, block_size=4096, tie_embeddings=False),
}


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters counted from the shapes in gpt.py, without building the model. "embedding"
    is the token table (plus an untied output head); a tied head is counted once."""
    d, hs = cfg.n_embd, cfg.head_dim
    attention = d * cfg.n_head * hs + 2 * d * cfg.n_kv_head * hs + cfg.n_head * hs * d
    qk_norm = 2 * hs if cfg.qk_norm else 0
    per_layer = attention + qk_norm + 3 * d * cfg.ffn_width() + 2 * d  # + two RMSNorm weights
    non_embedding = cfg.n_layer * per_layer + d  # + the final RMSNorm
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return {"total": non_embedding + embedding, "non_embedding": non_embedding}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, forward and backward: 6N, with N the non-embedding
    parameters plus the output head (the embedding lookup is not a matmul, the head is, tied
    or not), plus 12·L·H·Q·T for the attention scores and their weighted sum (PaLM, app. B)."""
    matmul_params = param_counts(cfg)["non_embedding"] + cfg.vocab_size * cfg.n_embd
    return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
