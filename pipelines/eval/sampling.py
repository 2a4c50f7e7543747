"""Text from a checkpoint directory: encode prompts, decode with the KV cache, decode text.
Runs in-process."""

from __future__ import annotations

from pathlib import Path

import torch

from raylm.errors import RaylmError
from raylm.models import load_model
from raylm.models.generate import generate
from raylm.pipelines.data.tokenizer import eos_id, load_tokenizer
from raylm.pipelines.eval.scoring import encode_contexts
from raylm.storage import locate


def sample_texts(
    checkpoint_dir: Path,
    prompts: list[str],
    max_new_tokens: int = 120,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    stop: tuple[str, ...] = (),
    seed: int = 0,
) -> list[str]:
    """Each prompt plus its continuation, decoded as one batch. A prompt follows the tokenizer's
    BOS if it adds one (an imported Llama's; raylm's add none), an empty one starts a fresh
    document (BOS, else after EOS), as scored tasks encode them; a continuation ends before EOS
    or any `stop` string."""
    model = load_model(checkpoint_dir)
    tok = load_tokenizer(locate(checkpoint_dir) / "tokenizer.json")
    eos = eos_id(tok)
    stops = (eos, *(_single_token(tok, s) for s in stop))
    ids = encode_contexts(tok, prompts)
    try:
        new = generate(
            model, ids, max_new_tokens, temperature, top_k, top_p, stops, torch.Generator().manual_seed(seed)
        )
    except ValueError as err:
        raise RaylmError(f"generate: {err}") from None
    return [p + tok.decode(n) for p, n in zip(prompts, new)]


def sample_text(
    checkpoint_dir: Path,
    prompt: str = "",
    max_new_tokens: int = 120,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> str:
    return sample_texts(checkpoint_dir, [prompt], max_new_tokens, temperature, top_k, seed=seed)[0]


def _single_token(tok, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False).ids
    if len(ids) != 1:
        raise RaylmError(f"--stop {text!r} is {len(ids)} tokens of this tokenizer; a stop string must be one token")
    return ids[0]
