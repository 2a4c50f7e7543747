import json

import numpy as np
import pyarrow as pa

from raylm.pipelines.data.decontam import build_index, contaminating_sets
from raylm.pipelines.data.dedup import dedup_columns, exact_keys, first_of_each, lsh_bands, near_duplicates, words

VOCAB = [f"w{i}" for i in range(5000)]


def random_doc(rng, n=200) -> list[str]:
    return list(rng.choice(VOCAB, size=n))


def edit(words: list[str], rng, fraction: float) -> list[str]:
    out = list(words)
    for i in rng.choice(len(out), size=max(1, int(fraction * len(out))), replace=False):
        out[i] = "changed"
    return out


def signatures(texts, bands=32, num_perm=128):
    cols = dedup_columns(pa.array(texts), num_perm, bands, shingle_words=5, exact=True, near=True)
    return cols["band_keys"], cols["signature"]


def test_exact_key_ignores_case_spacing_and_punctuation():
    keys = exact_keys(words(pa.array(["Hello, World!", "hello world", "  HELLO   world. ", "hello there"])))
    assert first_of_each(keys).tolist() == [False, True, True, False]


def test_a_signature_does_not_depend_on_its_batch():
    """Blocks differ between clusters; a document's keys must not."""
    rng = np.random.default_rng(2)
    texts = [" ".join(random_doc(rng, n)) for n in (200, 3, 1, 57)] + ["...", "one"]
    together = dedup_columns(pa.array(texts), 128, 32, 5, True, True)
    for i, text in enumerate(texts):
        alone = dedup_columns(pa.array([text]), 128, 32, 5, True, True)
        for key in ("exact_key", "signature", "band_keys"):
            assert np.array_equal(alone[key][0], together[key][i]), (key, i)


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
    (tmp_path / "other.jsonl").write_text(
        json.dumps({"ctx": "a completely different sentence about rivers and hills"}) + "\n"
    )
    index = build_index([str(tmp_path / "*.jsonl")], n=13)
    assert set(index) == {f"{tmp_path.name}/gsm", f"{tmp_path.name}/other"}
    leaked = "Homework: " + question.upper() + ". How many clips did she sell?"
    texts = [leaked, "Natalia sold clips to 48 of her friends.", "72", "rivers and hills"]
    # Under 13 words there is no n-gram: short answers ("72") never match on their own.
    assert contaminating_sets(texts, index, 13) == [f"{tmp_path.name}/gsm", "", "", ""]
