"""Byte-level BPE with Hugging Face `tokenizers`: training, loading, bytes per token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raylm.config import TokenizerSection
from raylm.storage import Location, locate


def train_tokenizer(texts: Iterator[list[str]], section: TokenizerSection, path: Path) -> Tokenizer:
    """Train on batches of documents and save tokenizer.json at path. EOS is the first special
    token (id 0), then tokenizer.special_tokens in order (ids 1, 2, ...): each encodes whole."""
    tok = Tokenizer(models.BPE())
    # Byte-level: every byte is a symbol, so any input encodes with no unknown token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=section.vocab_size,
        min_frequency=section.min_frequency,
        special_tokens=list(dict.fromkeys([section.eos_token, *section.special_tokens])),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def load_tokenizer(path: str | Path | Location) -> Tokenizer:
    """A tokenizer.json on a local disk, a volume or object storage (a checkpoint's)."""
    return Tokenizer.from_str(locate(path).read_text())


# End-of-text markers of tokenizers that come with imported Hugging Face models (GPT-2, Llama 2,
# Llama 3, Gemma), where the lowest special id is often a begin-of-text or unknown token.
KNOWN_EOS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def eos_id(tok: Tokenizer) -> int:
    """The end-of-document token. train_tokenizer registers EOS as the first special token, so
    it has the lowest id; an imported tokenizer's is found by its usual name first."""
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    named = [specials[name] for name in KNOWN_EOS if name in specials]
    return named[0] if named else min(specials.values())


def eos_stop(tok: Tokenizer) -> tuple[int, ...]:
    """EOS as a decoding stop, if the tokenizer has one (a plain word-level tokenizer has none)."""
    return (eos_id(tok),) if any(t.special for t in tok.get_added_tokens_decoder().values()) else ()


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens), for bits-per-byte.

    Byte-level BPE spells each byte as one printable character, so a token's byte count is the
    length of its string; special tokens (EOS) stand for no text."""
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    for token, idx in tok.get_vocab().items():
        lengths[idx] = 0 if token in specials else len(token)
    return lengths
