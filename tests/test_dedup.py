"""Dedup keys per document, and the rule that decides which documents go: judge.py's Ray Data
sorts against a single-process reference of the same rule (below), on planted duplicates."""

import json

import numpy as np
import pyarrow as pa
import ray.data

from raylm.config import DedupSection
from raylm.pipelines.data import judge
from raylm.pipelines.data.arrays import as_fixed_list
from raylm.pipelines.data.decontam import build_index, contaminating_sets
from raylm.pipelines.data.dedup import dedup_columns, exact_keys, lsh_bands, words
from raylm.pipelines.data.judge import DropIndex, PosBlocks, duplicates, even_cuts, position

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


# -- the reference: the rule in one process, as raylm decided it in its driver until judge.py --


def first_of_each(keys: np.ndarray) -> np.ndarray:
    """Mask of exact duplicates (in input order): True where the key appeared earlier."""
    _, first = np.unique(keys, return_index=True)
    dup = np.ones(len(keys), dtype=bool)
    dup[first] = False
    return dup


def near_duplicates(bands: np.ndarray, signatures: np.ndarray, threshold: float) -> np.ndarray:
    """Mask of near duplicates (rows in input order): in each LSH bucket, members linked to the
    bucket's first if their signatures agree on >= threshold; of each connected cluster, every
    member but the first goes (union-find)."""
    parent = np.arange(len(bands))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for column in bands.T:
        order = np.argsort(column, kind="stable")
        keys = column[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        for start, end in zip(starts, np.r_[starts[1:], len(order)]):
            group = order[start:end]
            for other in group[1:]:
                if (signatures[group[0]] == signatures[other]).mean() >= threshold:
                    ra, rb = root(group[0]), root(other)
                    parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(i) != i for i in range(len(bands))], dtype=bool)


def reference_reasons(cols: dict, threshold: float) -> np.ndarray:
    reasons = np.full(len(cols["exact_key"]), "", dtype=object)
    reasons[first_of_each(cols["exact_key"])] = "exact_duplicate"
    alive = np.flatnonzero(reasons == "")
    near = near_duplicates(cols["band_keys"][alive], cols["signature"][alive], threshold)
    reasons[alive[near]] = "near_duplicate"
    return reasons


def planted_corpus(rng, n: int) -> list[str]:
    """Random documents, exact copies (15%) and 1-3 word edits (30%) of earlier ones: edits of
    edits make clusters whose ends need not match each other."""
    vocab, docs = [f"w{i}" for i in range(3000)], []
    for _ in range(n):
        r = rng.random()
        if docs and r < 0.15:
            docs.append(docs[rng.integers(len(docs))])
        elif docs and r < 0.45:
            words_ = docs[rng.integers(len(docs))].split()
            for j in rng.choice(len(words_), rng.integers(1, 4), replace=False):
                words_[j] = f"x{rng.integers(9)}"
            docs.append(" ".join(words_))
        else:
            docs.append(" ".join(rng.choice(vocab, 60)))
    return docs


def test_ray_data_judge_drops_what_the_reference_rule_drops(ray_cluster):
    """Rows in input order, handed to Ray in blocks whose order is not the input's: the same
    documents go, for the same reasons, as in the one-process reference."""
    rng = np.random.default_rng(0)
    texts = planted_corpus(rng, 800)
    cols = dedup_columns(pa.array(texts), 128, 32, 5, True, True)
    pos = position(np.repeat(np.arange(8), 100), np.tile(np.arange(1, 101) * 3, 8))  # 8 files
    table = pa.table(
        {
            "pos": pos,
            "exact_key": cols["exact_key"],
            "band_keys": as_fixed_list(cols["band_keys"]),
            "signature": as_fixed_list(cols["signature"]),
        }
    )
    blocks = [table.slice(i, 100) for i in rng.permutation(np.arange(0, 800, 100))]
    got = DropIndex.of(duplicates(ray.data.from_arrow(blocks), DedupSection())).reasons(pos)
    want = reference_reasons(cols, DedupSection().threshold)
    assert {r: int((want == r).sum()) for r in ("exact_duplicate", "near_duplicate")} == {
        "exact_duplicate": 113,
        "near_duplicate": 85,
    }  # the planted corpus has both, plenty of each
    assert got.tolist() == want.tolist()


def test_drop_index_looks_up_across_blocks_and_exact_wins(ray_cluster):
    drops = [
        pa.table({"pos": [2, 5, 9], "reason": ["near_duplicate"] * 3}),
        pa.table({"pos": pa.array([], pa.int64()), "reason": pa.array([], pa.string())}),
        pa.table({"pos": [9, 40, 41], "reason": ["exact_duplicate", "near_duplicate", "exact_duplicate"]}),
    ]
    index = DropIndex.of(ray.data.from_arrow(drops).materialize())
    assert len(index.rows.blocks) == 2  # the empty block is not kept
    pos = np.array([41, 1, 9, 2, 40, 100])
    assert index.reasons(pos).tolist() == [
        "exact_duplicate",
        "",
        "exact_duplicate",
        "near_duplicate",
        "near_duplicate",
        "",
    ]
    assert index.reasons(np.array([3, 4])).tolist() == ["", ""]


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


def test_signature_lookup_reads_only_the_blocks_a_batch_falls_in(ray_cluster):
    """Blocks out of input order, rows out of order inside a block: each position gets its own
    row, and a batch inside one block's range fetches that block alone."""
    rng = np.random.default_rng(1)
    pos = np.arange(0, 600, 2)
    signature = rng.integers(0, 2**32, (len(pos), 4), dtype=np.uint32)
    blocks = []
    for start in (400, 0, 200):
        rows = rng.permutation(np.flatnonzero((pos >= start) & (pos < start + 200)))
        blocks.append(pa.table({"pos": pos[rows], "signature": as_fixed_list(signature[rows])}))
    index = PosBlocks.of(ray.data.from_arrow(blocks).materialize())
    asked = rng.permutation(len(pos))[:50]
    assert (index.of_positions(pos[asked]) == signature[asked]).all()
    assert index.covering(np.array([210, 398])).num_rows == 100  # one block of 100 rows


def test_even_cuts_of_hashed_keys_make_blocks_of_one_size(ray_cluster, monkeypatch):
    """Band keys and exact keys are spread over int64, so the bucket and exact sorts cut that
    range evenly; Ray's sampled cuts (10 rows per output block) left blocks up to ~1.5x the mean."""
    rng = np.random.default_rng(2)
    keys, _ = signatures([" ".join(random_doc(rng, 80)) for _ in range(2000)])
    for column in (keys.ravel(), exact_keys(words([" ".join(random_doc(rng, 30)) for _ in range(20000)]))):
        sizes = np.bincount(np.searchsorted(even_cuts(16), column, side="right"), minlength=16)
        assert sizes.max() / sizes.mean() < 1.1, sizes
    rows = ray.data.from_arrow(pa.table({"key": keys.ravel(), "pos": np.arange(keys.size)}))
    monkeypatch.setattr(judge, "BLOCK_BYTES", rows.size_bytes() // 4)
    blocks = [ray.get(b) for b in judge._sorted(rows, "key", hashed=True).materialize().to_arrow_refs()]
    sizes = np.array([b.num_rows for b in blocks])
    assert len(sizes) == 4 and sizes.max() / sizes.mean() < 1.1, sizes
    ordered = np.concatenate([b.column("key").to_numpy() for b in blocks])
    assert (np.diff(ordered) >= 0).all() and len(ordered) == keys.size
