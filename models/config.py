"""The model a run builds, and what it costs: parameter counts and training FLOPs.

The shape's fields, defaults, presets and checks are the spine's (raylm.config.ModelShape,
PRESETS); ModelConfig adds what only a built model has. No torch here: the CLI validates a
config, and the cost model and search (tuning/) size models, without building one.
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from raylm.config import ModelSection, ModelShape


class ModelConfig(ModelShape):
    """A model's shape with its vocabulary fixed and n_kv_head filled in; saved as model.json."""

    vocab_size: int = Field(gt=0)
    norm_eps: float = 1e-5  # RMSNorm epsilon; imported checkpoints bring their own

    @model_validator(mode="after")
    def _kv_heads(self) -> ModelConfig:
        self.n_kv_head = self.n_kv_head or self.n_head
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def ffn_width(self) -> int:
        """ffn_hidden if given (imported checkpoints need theirs exactly), else Llama's rule:
        2/3 of 4d keeps SwiGLU's three matrices at the cost of a 4d GELU MLP's two, rounded
        up to a multiple of 64 so matmuls tile well."""
        return self.ffn_hidden or 64 * math.ceil(int(2 * 4 * self.n_embd / 3) / 64)

    def to_dict(self) -> dict:
        return self.model_dump()


def planned_model(section: ModelSection, tokenizer_vocab: int) -> ModelConfig:
    """The model a config trains, before any data exists: the section's shape, and its
    vocab_size or else the tokenizer's padded up to a multiple of 64."""
    # A multiple of 64 lets the embedding and output matmuls tile well (nanoGPT: 50257 -> 50304).
    vocab = section.vocab_size or 64 * math.ceil(tokenizer_vocab / 64)
    return ModelConfig(vocab_size=vocab, **section.model_dump(exclude={"vocab_size", "preset"}))


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters counted from the shapes in gpt.py, without building the model. "embedding"
    is the token table (plus an untied output head); a tied head is counted once."""
    d, hs = config.n_embd, config.head_dim
    attention = d * config.n_head * hs + 2 * d * config.n_kv_head * hs + config.n_head * hs * d
    qk_norm = 2 * hs if config.qk_norm else 0
    per_layer = attention + qk_norm + 3 * d * config.ffn_width() + 2 * d  # + two RMSNorm weights
    non_embedding = config.n_layer * per_layer + d  # + the final RMSNorm
    embedding = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    return {"total": non_embedding + embedding, "non_embedding": non_embedding}


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, forward and backward: 6N, with N the non-embedding
    parameters plus the output head (the embedding lookup is not a matmul, the head is, tied
    or not), plus 12·L·H·Q·T for the attention scores and their weighted sum (PaLM, app. B)."""
    matmul_params = param_counts(config)["non_embedding"] + config.vocab_size * config.n_embd
    return 6 * matmul_params + 12 * config.n_layer * config.n_head * config.head_dim * seq_len
