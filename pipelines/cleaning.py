"""Per-document cleaning and filtering, as plain Python (Ray Data calls `clean_batch`).

Transforms (each switchable, each measured in bytes): normalize -> scrub_pii -> lowercase ->
remove_stopwords. Filters (each a drop reason): too_short, too_long, quality_* (Gopher).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter

import numpy as np

from .config import CleanSection, QualitySection

TRANSFORMS = ("normalize", "scrub_pii", "lowercase", "remove_stopwords")

# C0 controls except tab and newline, plus DEL: they carry no text and confuse tokenizers.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
EXTRA_BLANK_LINES = re.compile(r"\n{3,}")
EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
IPV6 = re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b")
# Optional +country code, then 3 or 4 groups of digits joined by space, dot or dash; the
# match must hold 9-15 digits (ITU E.164 allows at most 15) to count as a phone number.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?|\d{1,4}[ .-])\d{2,4}[ .-]\d{2,4}(?:[ .-]\d{2,4})?(?![\w])")
# NLTK's English stop words, the seed's list (used only when remove_stopwords is on).
STOPWORDS = frozenset(
    "i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she "
    "her hers herself it its itself they them their theirs themselves what which who whom this that "
    "these those am is are was were be been being have has had having do does did doing a an the and "
    "but if or because as until while of at by for with about against between into through during "
    "before after above below to from up down in out on off over under again further then once here "
    "there when where why how all any both each few more most other some such no nor not only own "
    "same so than too very s t can will just don should now".split()
)
WORD = re.compile(r"\S+")


def normalize(text: str) -> str:
    """NFC, no control characters, no trailing spaces, at most one blank line in a row."""
    text = CONTROL_CHARS.sub("", unicodedata.normalize("NFC", text))
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip()
    return EXTRA_BLANK_LINES.sub("\n\n", text)


def scrub_pii(text: str) -> str:
    text = EMAIL.sub("<EMAIL>", text)
    text = IPV4.sub("<IP>", IPV6.sub("<IP>", text))
    return PHONE.sub(_phone_placeholder, text)


def _phone_placeholder(match: re.Match) -> str:
    digits = sum(c.isdigit() for c in match.group())
    return "<PHONE>" if 9 <= digits <= 15 else match.group()


def remove_stopwords(text: str) -> str:
    lines = (" ".join(w for w in line.split(" ") if w.lower().strip(".,;:!?\"'") not in STOPWORDS) for line in text.split("\n"))
    return "\n".join(lines)


def quality_problem(text: str, q: QualitySection) -> str:
    """The first Gopher heuristic the document fails, as a reason; "" if it passes them all."""
    words = WORD.findall(text)
    n = len(words)
    if not q.min_words <= n <= q.max_words:
        return "quality_word_count"
    mean_len = sum(map(len, words)) / n
    if not q.min_mean_word_length <= mean_len <= q.max_mean_word_length:
        return "quality_mean_word_length"
    if (text.count("#") + text.count("...") + text.count("\u2026")) / n > q.max_symbol_word_ratio:
        return "quality_symbol_ratio"
    if sum(any(c.isalpha() for c in w) for w in words) / n < q.min_alpha_word_fraction:
        return "quality_alpha_words"
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and 1 - len(set(lines)) / len(lines) > q.max_duplicate_line_fraction:
        return "quality_duplicate_lines"
    if n > 1 and _top_bigram_fraction(words) > q.max_top_bigram_fraction:
        return "quality_repeated_bigram"
    return ""


def _top_bigram_fraction(words: list[str]) -> float:
    """Characters inside occurrences of the most common word bigram / characters in all words."""
    bigram, count = Counter(zip(words, words[1:])).most_common(1)[0]
    return count * (len(bigram[0]) + len(bigram[1])) / sum(map(len, words))


def clean_document(text: str, cfg: CleanSection) -> tuple[str, str, list[int]]:
    """(cleaned text, drop reason or "", UTF-8 bytes after each of TRANSFORMS)."""
    if len(text) > cfg.max_chars:  # checked first: a 50 MB line is not worth normalizing
        size = len(text.encode())
        return text, "too_long", [size] * len(TRANSFORMS)
    steps = (cfg.normalize and normalize, cfg.scrub_pii and scrub_pii,
             cfg.lowercase and str.lower, cfg.remove_stopwords and remove_stopwords)
    sizes = []
    for step in steps:
        text = step(text) if step else text
        sizes.append(len(text.encode()))
    if len(text) < cfg.min_chars:
        return text, "too_short", sizes
    return text, quality_problem(text, cfg.quality) if cfg.quality.enabled else "", sizes


def clean_batch(batch: dict, cfg: CleanSection) -> dict:
    """Ray Data map_batches over document rows: clean kept rows, set reasons, record sizes."""
    texts, reasons, snippets = list(batch["text"]), list(batch["reason"]), list(batch["snippet"])
    sizes = np.zeros((len(texts), len(TRANSFORMS)), dtype=np.int64)
    for i, (text, reason) in enumerate(zip(texts, reasons)):
        if reason:
            continue
        texts[i], reasons[i], sizes[i] = clean_document(text, cfg)
        if reasons[i]:  # a dropped document travels on as a counted row, without its text
            texts[i], snippets[i] = "", texts[i][:120]
    columns = {"text": texts, "reason": reasons, "snippet": snippets}
    return {**batch, **{k: np.array(v, dtype=object) for k, v in columns.items()}, "bytes_after": sizes}


def assign_split(text: str, val_fraction: float, test_fraction: float = 0.0) -> str:
    """Deterministic by content: the same document lands in the same split on every run and
    node, and exact duplicates never straddle splits."""
    u = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"
