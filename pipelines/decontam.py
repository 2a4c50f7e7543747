"""Eval-set contamination: word n-grams shared between a training document and an eval set.

The index holds, per eval file, the sorted 64-bit hashes of its word n-grams (every string
field of every JSONL row counts as eval text). A document is contaminated by an eval set when
it contains any of that set's n-grams (GPT-3, Brown et al. 2020, appendix C, used 13-grams).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np

from .dedup import ngram_hashes, words_of
from .errors import DataError


def build_index(paths: list[str], n: int) -> dict[str, np.ndarray]:
    index = {}
    for pattern in paths:
        files = [Path(f) for f in sorted(glob.glob(pattern, recursive=True)) if Path(f).is_file()]
        if not files:
            raise DataError(f"data.decontaminate.eval_paths: {pattern!r} matches no file")
        for f in files:
            hashes = [ngram_hashes(words_of(text), n) for text in _eval_texts(f)]
            index[f"{f.parent.name}/{f.stem}"] = np.unique(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)
    return index


def _eval_texts(path: Path):
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            yield from _strings(json.loads(line))


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def contaminating_sets(text: str, index: dict[str, np.ndarray], n: int) -> list[str]:
    grams = ngram_hashes(words_of(text), n)
    return [name for name, hashes in index.items() if np.isin(grams, hashes, assume_unique=False).any()]
