"""A decoder-only transformer as plain single-device PyTorch.

Llama-style blocks: RoPE positions, RMSNorm, SwiGLU MLP and grouped-query attention through
`scaled_dot_product_attention` (flash kernels on GPU), optional QK-norm, and a KV cache for
decoding batches of left-padded prompts. Nothing here knows about Ray or distribution: data
parallelism is applied to this module from the outside (pipelines/train/loop.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from raylm.config import RopeScaling
from raylm.models.config import ModelConfig


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (block_size, head_dim), in the "rotate half" layout Hugging Face uses."""
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)
    if config.rope_scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, config.rope_scaling)
    angles = torch.outer(torch.arange(config.block_size).float(), inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1's scaled RoPE frequencies. A dimension that turns fewer than low_freq_factor
    times over the pretraining context (Llama 3.1: wavelength > 8192/1 tokens, less than one
    turn) never saw its angles wrap, so it is slowed by `factor` to stretch over the longer
    context; one turning more than high_freq_factor times (wavelength < 8192/4 = 2048) encodes
    local order and is kept; between the two the frequency is interpolated."""
    wavelen = 2 * math.pi / inv_freq
    turns = scaling.original_max_position_embeddings / wavelen  # turns over the pretraining context
    # 0 at or below low_freq_factor turns (fully scaled), 1 at or above high_freq_factor (kept):
    # the clamp gives both outer bands the exact values, the middle the linear blend.
    keep = ((turns - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)).clamp(0, 1)
    return (1 - keep) * inv_freq / scaling.factor + keep * inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs); cos/sin (T, hs), or (B, 1, T, hs) when rows sit at different positions."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer for `length` slots of a batch, filled as decoding goes.
    Slots, not positions: a left-padded row's tokens sit at slot = position + its padding."""

    def __init__(self, config: ModelConfig, batch: int, length: int, device=None, dtype=torch.float32):
        shape = (config.n_layer, batch, config.n_kv_head, length, config.head_dim)
        self.k, self.v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        self.filled = 0  # slots written by all layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, nkv, T, hs) keys and values; return all of them so far."""
        end = self.filled + k.shape[2]
        self.k[layer, :, :, self.filled : end], self.v[layer, :, :, self.filled : end] = k, v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, config.n_head, config.n_kv_head, config.head_dim
        self.wq = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        # GQA: fewer key/value heads shrink the KV cache by n_head / n_kv_head at decode time.
        self.wk = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.wv = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
        self.qk_norm, self.dropout = config.qk_norm, config.dropout

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None) -> torch.Tensor:
        """mask (B, 1, T, S) of allowed keys, or None for plain causal attention (or, for a
        single new token, attention to everything cached)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hs), S = cached + T
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and k.shape[2] == T,  # False only for one token after a cache
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, C)
        return self.wo(y)


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.ffn_width()
        self.w1 = nn.Linear(config.n_embd, hidden, bias=False)  # gate
        self.w3 = nn.Linear(config.n_embd, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, config.n_embd, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask=None, cache=None) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), cos, sin, mask, cache))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Not persistent: derived from the config, so checkpoints hold weights only.
        self.register_buffer("rope_cos", torch.empty(config.block_size, config.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(config.block_size, config.head_dim), persistent=False)
        if self.rope_cos.is_meta:  # built on the meta device: parameters are allocated and drawn later
            return
        self.fill_rope()
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(self.initial_value(name, p.shape))

    def initial_value(self, name: str, shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """A parameter's initial values, whole, on the CPU: norm scales 1, every other weight
        N(0, 0.02), except each block's two residual output projections (attn.wo, mlp.w2), which
        start at GPT-2's 0.02/sqrt(2*n_layer) so the residual stream's variance stays flat over
        depth. A sharded model draws each whole parameter from its own generator and keeps its
        slice (pipelines/train/parallelize.py), so the values are the same on any worker count."""
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        residual = name.endswith(("attn.wo.weight", "mlp.w2.weight"))
        std = 0.02 / math.sqrt(2 * self.config.n_layer) if residual else 0.02
        return torch.empty(shape).normal_(mean=0.0, std=std, generator=generator)

    def fill_rope(self) -> None:
        """The RoPE tables, in place (again after a meta-device model is allocated)."""
        cos, sin = rope_tables(self.config)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        pad: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ):
        """idx (B, T) token ids -> logits (B, T, vocab); with targets also the mean loss over
        targets other than -100 (fine-tuning masks prompts that way).
        With a cache, idx continues the cached slots; pad (B,) is each row's left padding.
        segments (B, T): packed examples, one id per example; a token attends only to earlier
        tokens of its own example, and positions restart at each example's first token."""
        T = idx.shape[1]
        start = cache.filled if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        cos, sin, mask = self._segments(segments) if segments is not None else self._positions(start, T, pad)
        x = self.emb_dropout(self.tok_emb(idx))  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.filled += T
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def _positions(self, start: int, T: int, pad: torch.Tensor | None):
        """RoPE tables for slots start..start+T, and the attention mask (None: plain causal)."""
        if pad is None and (start == 0 or T == 1):  # training, prefill, or one token after the cache
            return self.rope_cos[start : start + T], self.rope_sin[start : start + T], None
        if pad is None:  # a chunk after cached tokens: causal, shifted by `start`
            pad = torch.zeros(1, dtype=torch.long, device=self.rope_cos.device)
        slots = torch.arange(start, start + T, device=pad.device)  # (T,)
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        keys = torch.arange(start + T, device=pad.device)  # (S,)
        # A key is visible if it is not later and not padding; a pad slot sees itself only,
        # so no row is fully masked (that would put NaN into the cache).
        mask = (keys <= slots[:, None]) & ((keys >= pad[:, None, None]) | (keys == slots[:, None]))  # (B, T, S)
        return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1), mask.unsqueeze(1)

    def _segments(self, segments: torch.Tensor):
        """RoPE tables and mask for packed examples: causal within each run of equal ids."""
        B, T = segments.shape
        index = torch.arange(T, device=segments.device)
        first = torch.ones_like(segments, dtype=torch.bool)
        first[:, 1:] = segments[:, 1:] != segments[:, :-1]  # an example's first token
        starts = torch.where(first, index, 0).cummax(dim=1).values  # (B, T): where each token's example began
        positions = index - starts  # (B, T)
        same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
        mask = same & (index[None, :] <= index[:, None])  # causal within the example
        return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1), mask.unsqueeze(1)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied head is counted once
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n
