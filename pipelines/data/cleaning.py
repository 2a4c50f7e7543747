"""Cleaning and filtering a batch of documents (Ray Data calls `clean_batch` with Arrow tables).

Transforms (each switchable, each measured in bytes): normalize -> scrub_pii -> lowercase ->
remove_stopwords. Filters (each a drop reason): too_long (checked first, on the text as read),
too_short, quality_* (Gopher). The bulk work runs as Arrow compute kernels over the whole
batch; Python touches only the documents a regex marked (PII) or the optional filters.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylm.config import CleanSection, QualitySection
from raylm.pipelines.data.readers import SNIPPET_CHARS

TRANSFORMS = ("normalize", "scrub_pii", "lowercase", "remove_stopwords")

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
IPV6 = re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b")
# Optional +country code, then 3 or 4 groups of digits joined by space, dot or dash; the
# match must hold 9-15 digits (ITU E.164 allows at most 15) to count as a phone number.
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?|\d{1,4}[ .-])\d{2,4}[ .-]\d{2,4}(?:[ .-]\d{2,4})?(?![\w])"
)
PII_HINT = r"@|\d[ .\-)]?\d"  # RE2, over the whole batch: only documents matching it are scrubbed
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


def normalize(texts: pa.Array) -> pa.Array:
    """NFC; C0 controls except tab and newline, and DEL, removed (they carry no text and confuse
    tokenizers); trailing spaces trimmed on every line; at most one blank line in a row."""
    texts = _nfc(texts)
    texts = pc.replace_substring_regex(texts, r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "")
    texts = pc.replace_substring_regex(texts, r"[^\S\n]+\n", "\n")
    texts = pc.replace_substring_regex(texts, r"\n{3,}", "\n\n")
    return pc.utf8_trim_whitespace(texts)


def _nfc(texts: pa.Array) -> pa.Array:
    """Unicode NFC in Python (Arrow's utf8_normalize left "e\u0301" decomposed in pyarrow 25);
    ASCII text is NFC already, so only documents with other characters are touched."""
    values = texts.to_pylist()
    for i in np.flatnonzero(pc.match_substring_regex(texts, r"[^\x00-\x7f]").to_numpy(zero_copy_only=False)):
        values[i] = unicodedata.normalize("NFC", values[i])
    return pa.array(values, pa.string())


def scrub_pii(texts: pa.Array) -> pa.Array:
    """E-mail addresses, IP addresses and phone numbers replaced by <EMAIL>, <IP>, <PHONE>."""
    values = texts.to_pylist()
    for i in np.flatnonzero(pc.match_substring_regex(texts, PII_HINT).to_numpy(zero_copy_only=False)):
        values[i] = _scrub_one(values[i])
    return pa.array(values, pa.string())


def _scrub_one(text: str) -> str:
    text = EMAIL.sub("<EMAIL>", text)
    text = IPV4.sub("<IP>", IPV6.sub("<IP>", text))
    return PHONE.sub(_phone_placeholder, text)


def _phone_placeholder(match: re.Match) -> str:
    digits = sum(c.isdigit() for c in match.group())
    return "<PHONE>" if 9 <= digits <= 15 else match.group()


def remove_stopwords(texts: pa.Array) -> pa.Array:
    def strip(text: str) -> str:
        keep = lambda w: w.lower().strip(".,;:!?\"'") not in STOPWORDS  # noqa: E731
        return "\n".join(" ".join(filter(keep, line.split(" "))) for line in text.split("\n"))

    return pa.array([strip(t) for t in texts.to_pylist()], pa.string())


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


def clean_batch(batch: pa.Table, clean: CleanSection) -> pa.Table:
    """Ray Data map_batches over document rows: transform kept rows, set drop reasons, and
    record each document's UTF-8 size after every transform in `bytes_after`."""
    reasons = batch.column("reason").to_numpy(zero_copy_only=False).astype(object)
    too_long = (reasons == "") & (pc.utf8_length(batch.column("text")).to_numpy() > clean.max_chars)
    reasons[too_long] = "too_long"
    text = pc.if_else(pa.array(too_long), "", batch.column("text").combine_chunks())  # not worth cleaning
    steps = {
        "normalize": normalize,
        "scrub_pii": scrub_pii,
        "lowercase": pc.utf8_lower,
        "remove_stopwords": remove_stopwords,
    }
    sizes = []
    for name in TRANSFORMS:
        if getattr(clean, name):
            text = steps[name](text)
        sizes.append(pc.binary_length(text).to_numpy())
    sizes = np.stack(sizes, axis=1).astype(np.int64)
    sizes[too_long] = batch.column("raw_bytes").to_numpy()[too_long, None]
    reasons[(reasons == "") & (pc.utf8_length(text).to_numpy() < clean.min_chars)] = "too_short"
    if clean.quality.enabled:
        for i in np.flatnonzero(reasons == ""):
            reasons[i] = quality_problem(text[i].as_py(), clean.quality)
    return _with_drops(batch, text, reasons, sizes)


def _with_drops(batch: pa.Table, text: pa.Array, reasons: np.ndarray, sizes: np.ndarray) -> pa.Table:
    """A dropped document travels on as a counted row with a snippet (of the text as read),
    without its text."""
    new_drop = pa.array((reasons != "") & (batch.column("reason").to_numpy(zero_copy_only=False) == ""))
    as_read = pc.utf8_slice_codeunits(batch.column("text").combine_chunks(), 0, SNIPPET_CHARS)
    snippet = pc.if_else(new_drop, as_read, batch.column("snippet").combine_chunks())
    text = pc.if_else(pa.array(reasons != ""), "", text)
    columns = {"text": text, "reason": pa.array(reasons, pa.string()), "snippet": snippet}
    for name, column in columns.items():
        batch = batch.set_column(batch.schema.get_field_index(name), name, column)
    return batch.append_column("bytes_after", pa.FixedSizeListArray.from_arrays(sizes.ravel(), len(TRANSFORMS)))


def assign_split(text: str, val_fraction: float, test_fraction: float = 0.0) -> str:
    """Deterministic by content: the same document lands in the same split on every run and
    node, and exact duplicates never straddle splits."""
    u = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"
