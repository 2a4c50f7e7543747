"""Plain-Python text handling for the data pipeline: decoding, cleaning, document split.

Ray Data calls these per row; they know nothing about Ray, so tests call them directly."""

from __future__ import annotations

import hashlib
import re
import unicodedata

# C0 controls except tab and newline, plus DEL: they carry no text and confuse tokenizers.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")


def clean(text: str) -> str:
    """NFC, no control characters, no trailing spaces, no leading/trailing blank lines."""
    text = unicodedata.normalize("NFC", text)
    text = CONTROL_CHARS.sub("", text)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def split_documents(text: str, boundary: str) -> list[str]:
    if boundary == "file":
        return [text]
    if boundary == "line":
        return text.split("\n")
    return BLANK_LINES.split(text)  # "paragraph": blank-line separated blocks


def assign_split(text: str, val_fraction: float) -> str:
    """Deterministic by content: the same document lands in the same split on every run and
    node, and exact duplicates never straddle train and validation."""
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    return "val" if h / 2**64 < val_fraction else "train"


def documents_of_file(row: dict, boundary: str, min_chars: int, val_fraction: float) -> list[dict]:
    """Ray Data flat_map: one file's bytes -> its cleaned documents, too-short ones marked "drop"."""
    raw = row["bytes"].decode("utf-8", errors="replace").removeprefix("\ufeff")
    raw = raw.replace("\r\n", "\n").replace("\r", "\n")
    out = []
    for piece in split_documents(raw, boundary):
        doc = clean(piece)
        split = assign_split(doc, val_fraction) if len(doc) >= min_chars else "drop"
        out.append({"text": doc, "split": split, "raw_bytes": len(piece.encode()), "n_bytes": len(doc.encode())})
    return out
