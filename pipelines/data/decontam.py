"""Eval-set contamination: word n-grams shared between a training document and an eval set.

The index holds, per eval file, the sorted 64-bit hashes of its word n-grams (every string
field of every JSONL row counts as eval text). A document is contaminated by an eval set when
it contains any of that set's n-grams (GPT-3, Brown et al. 2020, appendix C, used 13-grams).
Text shorter than n words has no n-grams, so short answers ("42") never match on their own.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from raylm.errors import DataError
from raylm.pipelines.data.dedup import shingle_hashes, word_hashes, words


def ngrams(texts: list[str] | pa.Array, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash of every word n-gram, index of its text); texts under n words give none."""
    h, offsets = word_hashes(words(texts))
    hashes, text_of = shingle_hashes(h, offsets, n)
    long_enough = np.diff(offsets)[text_of] >= n
    return hashes[long_enough], text_of[long_enough]


def build_index(paths: list[str], n: int) -> dict[str, np.ndarray]:
    index = {}
    for pattern in paths:
        files = [Path(f) for f in sorted(glob.glob(pattern, recursive=True)) if Path(f).is_file()]
        if not files:
            raise DataError(f"data.decontaminate.eval_paths: {pattern!r} matches no file")
        for f in files:
            texts = list(_eval_texts(f))
            index[f"{f.parent.name}/{f.stem}"] = np.unique(ngrams(texts, n)[0]) if texts else np.zeros(0, np.uint64)
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


def contaminating_sets(texts: list[str] | pa.Array, index: dict[str, np.ndarray], n: int) -> list[str]:
    """Per text, the comma-joined names of the eval sets it shares an n-gram with."""
    hashes, text_of = ngrams(texts, n)
    hits: list[list[str]] = [[] for _ in range(len(texts))]
    for name, eval_hashes in index.items():
        for t in np.unique(text_of[np.isin(hashes, eval_hashes)]):
            hits[t].append(name)
    return [",".join(h) for h in hits]
