"""Duplicate and contamination detection over word n-grams, as plain numpy.

Exact: a 64-bit hash of the document's lowercased words. Near: MinHash signatures over word
shingles, banded for LSH (Broder 1997; Leskovec et al., Mining of Massive Datasets ch. 3);
candidates sharing a band are confirmed by their estimated Jaccard similarity. Workers compute
keys and signatures; the driver holds one small index (16 + 4 x num_perm bytes per document)
to decide, which keeps the choice of survivor deterministic: the first document in input order.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

import numpy as np

WORDS = re.compile(r"\w+")
MERSENNE_31 = np.uint64(2**31 - 1)  # (a * x + b) mod p with x < 2^32, a < p stays under 2^63


@lru_cache(maxsize=1 << 20)
def word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def words_of(text: str) -> list[str]:
    return WORDS.findall(text.lower())


def ngram_hashes(words: list[str], n: int) -> np.ndarray:
    """64-bit hashes of every word n-gram; none for text shorter than n words."""
    h = np.fromiter((word_hash(w) for w in words), dtype=np.uint64, count=len(words))
    if len(h) < n:
        return np.zeros(0, dtype=np.uint64)
    out = np.zeros(len(h) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):  # multiply-and-add wraps modulo 2^64 on purpose
        for k in range(n):
            out = out * np.uint64(1_000_003) + h[k : len(h) - n + 1 + k]
    return out


def exact_key(text: str) -> int:
    """Same words in the same order, whatever the case, spacing or punctuation."""
    digest = hashlib.blake2b(" ".join(words_of(text)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(1, int(MERSENNE_31), num_perm, dtype=np.uint64),
            rng.integers(0, int(MERSENNE_31), num_perm, dtype=np.uint64))


def shingles(text: str, n: int) -> np.ndarray:
    """Word n-gram hashes; a document shorter than n words is one shingle of all its words."""
    words = words_of(text)
    return ngram_hashes(words, min(n, len(words))) if words else np.zeros(0, dtype=np.uint64)


def minhash(shingles: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signature (num_perm,) uint32 of a set of 64-bit shingle hashes."""
    if len(shingles) == 0:
        return np.full(len(a), 2**32 - 1, dtype=np.uint32)
    x = np.unique((shingles ^ (shingles >> np.uint64(32))) & np.uint64(0xFFFFFFFF))  # (S,)
    return ((a[:, None] * x[None, :] + b[:, None]) % MERSENNE_31).min(axis=1).astype(np.uint32)  # (P,)


def lsh_bands(num_perm: int, threshold: float, recall: float = 0.99) -> int:
    """Fewest bands b (dividing num_perm) such that two documents with Jaccard similarity
    `threshold` share a band with probability >= recall: 1 - (1 - t^r)^b, r = num_perm / b."""
    for b in (d for d in range(1, num_perm + 1) if num_perm % d == 0):
        if 1 - (1 - threshold ** (num_perm // b)) ** b >= recall:
            return b
    return num_perm


def band_keys(signature: np.ndarray, bands: int) -> np.ndarray:
    """One 64-bit key per band: documents that share any key become candidates."""
    rows = signature.reshape(bands, -1)  # (bands, num_perm / bands)
    return np.array([int.from_bytes(hashlib.blake2b(r.tobytes() + bytes([i]), digest_size=8).digest(),
                                    "little", signed=True) for i, r in enumerate(rows)], dtype=np.int64)


def first_of_each(keys: np.ndarray) -> np.ndarray:
    """Boolean mask of exact duplicates: True where the key appeared at an earlier position."""
    _, first = np.unique(keys, return_index=True)
    dup = np.ones(len(keys), dtype=bool)
    dup[first] = False
    return dup


def near_duplicates(bands: np.ndarray, signatures: np.ndarray, threshold: float) -> np.ndarray:
    """bands (N, B) int64, signatures (N, P) uint32 -> mask of documents to drop: every member
    of a similarity cluster except its first. Candidates come from shared band keys and are
    linked only if their signatures agree on at least `threshold` of the permutations."""
    parent = np.arange(len(bands))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for column in bands.T:
        order = np.argsort(column, kind="stable")
        sorted_keys = column[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, len(order)])
        for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):  # singletons have no pair
            group = order[start : start + size]
            for other in group[1:]:  # compare to the group's first member (lowest position)
                if (signatures[group[0]] == signatures[other]).mean() >= threshold:
                    ra, rb = root(group[0]), root(other)
                    parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(i) != i for i in range(len(bands))], dtype=bool)
