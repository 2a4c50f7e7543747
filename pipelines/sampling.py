"""Text from a checkpoint directory: encode a prompt, sample, decode. Runs in-process."""

from __future__ import annotations

from pathlib import Path

import torch

from raylm.models import load_model
from raylm.models.generate import generate

from .tokenizer import eos_id, load_tokenizer


def sample_text(checkpoint_dir: Path, prompt: str = "", max_new_tokens: int = 120,
                temperature: float = 0.8, top_k: int | None = 50, seed: int = 0) -> str:
    """The prompt plus its continuation. An empty prompt starts a fresh document after EOS;
    sampling stops at the next EOS."""
    model = load_model(checkpoint_dir)
    tok = load_tokenizer(Path(checkpoint_dir) / "tokenizer.json")
    eos = eos_id(tok)
    ids = tok.encode(prompt, add_special_tokens=False).ids if prompt else [eos]
    generator = torch.Generator().manual_seed(seed)
    out = generate(model, torch.tensor([ids]), max_new_tokens, temperature, top_k, stop_token=eos, generator=generator)
    new = [t for t in out[0, len(ids):].tolist() if t != eos]
    return prompt + tok.decode(new)
