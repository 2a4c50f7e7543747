"""Scoring packed windows: summed next-token loss in nats and the bytes those tokens cover.

Loss per byte, unlike loss per token, compares models across tokenizers (bits per byte, as
The Pile reports it: Gao et al. 2020).

Texts become the ids to score here too, the same way for raylm's tasks and the lm-eval adapter:
a context after the special tokens the tokenizer puts before a text (an imported Llama 2/3
tokenizer's BOS, as lm-eval's `hf` backend has it; raylm's own tokenizers put none), a
continuation without any, so that no BOS lands inside a scored answer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raylm.errors import DataError
from raylm.pipelines.data.loader import as_batch
from raylm.pipelines.data.tokenizer import KNOWN_EOS, eos_id

# Begin-of-text markers of imported tokenizers (Llama 3, Llama 2 and Mistral, Gemma), for one
# whose post-processor does not add its BOS.
KNOWN_BOS = ("<|begin_of_text|>", "<s>", "<bos>")


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


def context_start(tokenizer) -> list[int]:
    """The special tokens the tokenizer's post-processor puts before a text: a Llama 2/3
    tokenizer.json's BOS; none for raylm's own tokenizers. Found by encoding a probe with and
    without special tokens."""
    for probe in ("a", "0", " "):
        plain = tokenizer.encode(probe, add_special_tokens=False).ids
        if plain:
            full = tokenizer.encode(probe, add_special_tokens=True).ids
            at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
            return full[:at]
    return []


def document_start(tokenizer) -> int:
    """What an empty context stands for, a document's start: the tokenizer's BOS (the token its
    post-processor puts first, else a special token with a BOS name), else its end-of-document
    token, which the next document follows (raylm's own tokenizers: <|endoftext|>). The token
    lm-eval's `hf` backend puts there too (its tokenizer's BOS, else EOS)."""
    start = context_start(tokenizer)
    if start:
        return start[0]
    specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    named = [specials[name] for name in KNOWN_BOS if name in specials]
    named += [i for i in (tokenizer.token_to_id(name) for name in KNOWN_EOS) if i is not None]
    if named:
        return named[0]
    if specials:
        return eos_id(tokenizer)
    raise DataError(
        "the tokenizer has no begin- or end-of-text token to start a document from "
        f"(none of {', '.join(KNOWN_BOS + KNOWN_EOS)}, and no special tokens), which an empty context needs"
    )


def encode_contexts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Contexts (or prompts) as ids: each after `context_start`, an empty one `document_start`."""
    start, empty, out = context_start(tokenizer), None, []
    for text in texts:
        ids = start + tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            empty = document_start(tokenizer) if empty is None else empty
            ids = [empty]
        out.append(ids)
    return out


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) texts -> the ids `continuation_logliks` scores: the context as
    `encode_contexts` has it, the continuation without special tokens."""
    contexts = encode_contexts(tokenizer, [context for context, _ in pairs])
    return [(ids, tokenizer.encode(cont, add_special_tokens=False).ids) for ids, (_, cont) in zip(contexts, pairs)]
