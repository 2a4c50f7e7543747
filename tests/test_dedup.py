import json

import numpy as np

from raylm.pipelines.decontam import build_index, contaminating_sets
from raylm.pipelines.dedup import (band_keys, exact_key, first_of_each, lsh_bands, minhash, near_duplicates,
                                   permutations, shingles)

VOCAB = [f"w{i}" for i in range(5000)]


def random_doc(rng, n=200) -> list[str]:
    return list(rng.choice(VOCAB, size=n))


def edit(words: list[str], rng, fraction: float) -> list[str]:
    out = list(words)
    for i in rng.choice(len(out), size=max(1, int(fraction * len(out))), replace=False):
        out[i] = "changed"
    return out


def signatures(texts, bands=32, num_perm=128):
    a, b = permutations(num_perm)
    sigs = np.stack([minhash(shingles(t, 5), a, b) for t in texts])
    return np.stack([band_keys(s, bands) for s in sigs]), sigs


def test_exact_key_ignores_case_spacing_and_punctuation():
    keys = np.array([exact_key(t) for t in ["Hello, World!", "hello world", "  HELLO   world. ", "hello there"]])
    assert first_of_each(keys).tolist() == [False, True, True, False]


def test_planted_near_duplicates_go_and_distinct_documents_stay():
    rng = np.random.default_rng(0)
    originals = [random_doc(rng) for _ in range(40)]
    near = [edit(originals[i], rng, 0.01) for i in range(10)]  # 2 of 200 words: Jaccard ~0.9
    far = [edit(originals[i], rng, 0.4) for i in range(10, 20)]  # 80 of 200 words: Jaccard < 0.3
    texts = [" ".join(w) for w in originals + near + far]
    bands, sigs = signatures(texts)
    drop = near_duplicates(bands, sigs, threshold=0.8)
    assert drop.tolist() == [False] * 40 + [True] * 10 + [False] * 10


def test_the_first_of_a_cluster_survives():
    rng = np.random.default_rng(1)
    base = random_doc(rng)
    texts = [" ".join(edit(base, rng, 0.01)), " ".join(base), " ".join(edit(base, rng, 0.01))]
    bands, sigs = signatures(texts)
    assert near_duplicates(bands, sigs, 0.8).tolist() == [False, True, True]


def test_lsh_bands_catch_pairs_at_the_threshold():
    for threshold in (0.5, 0.8, 0.9):
        b = lsh_bands(128, threshold)
        r = 128 // b
        assert 1 - (1 - threshold**r) ** b >= 0.99
    assert lsh_bands(128, 0.8) == 32


def test_contamination_finds_shared_13_grams(tmp_path):
    question = "Natalia sold clips to 48 of her friends in April and then she sold half as many clips in May"
    (tmp_path / "gsm.jsonl").write_text(json.dumps({"question": question, "answer": "72"}) + "\n")
    (tmp_path / "other.jsonl").write_text(json.dumps({"ctx": "a completely different sentence about rivers and hills"}) + "\n")
    index = build_index([str(tmp_path / "*.jsonl")], n=13)
    assert set(index) == {f"{tmp_path.name}/gsm", f"{tmp_path.name}/other"}
    leaked = "Homework: " + question.upper() + ". How many clips did she sell?"
    assert contaminating_sets(leaked, index, 13) == [f"{tmp_path.name}/gsm"]
    assert contaminating_sets("Natalia sold clips to 48 of her friends.", index, 13) == []  # under 13 words
    assert contaminating_sets("72", index, 13) == []  # short answers never match on their own
