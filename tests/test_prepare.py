"""`raylm prepare` end to end on real Ray Data and real tokenizers: bad input, dedup,
decontamination, mixing, the report, strict mode and reuse."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from raylm.config import ClusterSection, TokenizerSection, load_config
from raylm.errors import ConfigError, DataError
from raylm.pipelines.data.loader import read_windows, token_matrix
from raylm.pipelines.data.manifest import Manifest
from raylm.pipelines.data.packing import PACK_ROWS, WindowHash, encode_and_pack, kept_documents, pack_stream
from raylm.pipelines.data.prepare import Source, find_prepared, mixing_repeats, prepare
from raylm.pipelines.data.tokenizer import eos_id, load_tokenizer, train_tokenizer
from raylm.pipelines.runtime import pool_cpus
from tests import corrupt_corpus
from tests.conftest import SHARED_DATA

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"


def run_prepare(tmp_path: Path, sources: list[dict], *extra: str) -> tuple[Manifest, dict]:
    cfg = load_config(
        None,
        [
            f"data.sources={json.dumps(sources)}",
            "data.seq_len=16",
            "tokenizer.vocab_size=300",
            "data.val_fraction=0.2",
            *extra,
        ],
    )
    manifest = prepare(cfg.data, cfg.tokenizer, tmp_path / "out")
    return manifest, json.loads((Path(manifest.path) / "report.json").read_text())


def write_duplicates(path: Path, rng) -> tuple[int, int]:
    """30 distinct 200-word documents plus planted copies: 5 exact (case and punctuation
    changed), 6 near (2 words of 200 changed), 5 far edits (40% changed) that must stay."""
    vocab = [f"w{i}" for i in range(3000)]
    originals = [list(rng.choice(vocab, 200)) for _ in range(30)]
    exact = [" ".join(w).upper() + "!" for w in originals[:5]]
    near, far = [], []
    for i in range(6):
        words = list(originals[5 + i])
        words[10], words[150] = "changed", "edited"
        near.append(" ".join(words))
    for i in range(5):
        words = list(originals[11 + i])
        for j in rng.choice(200, 80, replace=False):
            words[j] = f"x{j}"
        far.append(" ".join(words))
    rows = [" ".join(w) for w in originals] + exact + near + far
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return 5, 6


def check_funnel_adds_up(source: dict) -> None:
    stages = source["stages"]
    for before, after in zip(stages, stages[1:]):
        assert after["docs_in"] == before["docs_out"] and after["bytes_in"] == before["bytes_out"]
    dropped = sum(v["docs"] for v in source["rejects"].values())
    assert stages[0]["docs_in"] - dropped == stages[-1]["docs_out"]


@pytest.fixture(scope="module")
def mixed(ray_cluster, tmp_path_factory):
    """One prepare over three sources: corrupt files, planted duplicates, leaked eval text."""
    tmp = tmp_path_factory.mktemp("mixed")
    corrupt_corpus.build(tmp / "corrupt")
    planted = write_duplicates(tmp / "dups.jsonl", np.random.default_rng(0))
    questions = [json.loads(line)["question"] for line in GSM8K_TEST.read_text().splitlines()[:2]]
    (tmp / "leak.txt").write_text("\n\n".join(questions + ["A clean paragraph about gardens and rain."]))
    sources = [
        {"paths": [str(tmp / "corrupt")], "name": "corrupt"},
        {"paths": [str(tmp / "dups.jsonl")]},
        {"paths": [str(tmp / "leak.txt")]},
    ]
    manifest, report = run_prepare(
        tmp, sources, f"data.decontaminate.eval_paths=['{GSM8K_TEST}']", "data.decontaminate.drop=true"
    )
    return manifest, report, planted


def test_bad_input_gives_exact_counts_per_reason(mixed):
    _, report, _ = mixed
    corrupt = report["sources"]["corrupt"]
    assert {k: v["docs"] for k, v in corrupt["rejects"].items()} == corrupt_corpus.EXPECTED_REJECTS
    assert corrupt["fixes"] == corrupt_corpus.EXPECTED_FIXES
    assert corrupt["stages"][-1]["docs_out"] == corrupt_corpus.EXPECTED_KEPT
    assert corrupt["ignored_files"] == 1 and corrupt["ignored_examples"][0].endswith("notes.csv")
    assert corrupt["rejects"]["too_long"]["bytes"] == 50 * 2**20
    samples = {(s["reason"], Path(s["path"]).name, s["line"]) for s in report["reject_samples"]}
    assert ("malformed_json", "bad.jsonl", 2) in samples and ("invalid_utf8", "bad.txt", 3) in samples
    assert all(s["snippet"] for s in report["reject_samples"] if s["reason"] != "empty_file")


def test_planted_duplicates_go_and_distinct_documents_stay(mixed):
    _, report, (n_exact, n_near) = mixed
    dups = report["sources"]["dups"]
    assert {k: v["docs"] for k, v in dups["rejects"].items()} == {"exact_duplicate": n_exact, "near_duplicate": n_near}
    assert dups["stages"][-1]["docs_out"] == 30 + 5  # the originals and the far edits


def test_eval_set_contamination_is_reported_and_dropped(mixed):
    _, report, _ = mixed
    assert report["contamination"] == {"gsm8k/test": 2}
    assert report["sources"]["leak"]["rejects"] == {"contaminated": {"docs": 2, "bytes": pytest.approx(300, rel=0.6)}}


def test_report_adds_up_and_matches_the_windows(mixed):
    manifest, report, _ = mixed
    for source in report["sources"].values():
        check_funnel_adds_up(source)
    kept_tokens = sum(sum(s["tokens"].values()) for s in report["sources"].values())
    window_tokens = sum(s["tokens"] for s in report["splits"].values())
    assert 0 < window_tokens <= kept_tokens  # only each packing batch's last partial window is dropped
    assert kept_tokens - window_tokens < 3 * 17  # one batch per split here, under one 17-token window each
    for split in ("train", "val"):
        windows = read_windows(Path(manifest.path) / split)
        assert windows.shape == (manifest.splits[split].windows, 17)
        assert WindowHash.of(windows).hexdigest() == manifest.splits[split].content_hash
    tok = load_tokenizer(Path(manifest.path) / "tokenizer.json")
    assert tok.get_vocab_size() <= 300 and report["tokenizer"]["bytes_per_token"]["all"] > 1
    md = (Path(manifest.path) / "report.md").read_text()
    assert (
        "| dedup_near |" in md and "contaminated" in md and (Path(manifest.path) / "report.png").stat().st_size > 1000
    )


def test_mixing_weights_reach_the_asked_shares(ray_cluster, tmp_path):
    rng = np.random.default_rng(1)
    for name, n in (("big", 600), ("small", 150)):
        (tmp_path / f"{name}.txt").write_text(
            "\n\n".join(" ".join(rng.choice([f"{name}{i}" for i in range(400)], 40)) for _ in range(n))
        )
    sources = [
        {"paths": [str(tmp_path / "big.txt")], "weight": 1},
        {"paths": [str(tmp_path / "small.txt")], "weight": 1},
    ]
    _, report = run_prepare(tmp_path, sources, "data.dedup.near=false")
    big, small = report["sources"]["big"], report["sources"]["small"]
    assert big["share_asked"] == small["share_asked"] == 0.5
    assert abs(big["share_achieved"] - 0.5) < 0.06
    assert "mix_sampled_out" in big["rejects"] and "mix_sampled_out" not in small["rejects"]
    check_funnel_adds_up(big)


def test_a_small_source_is_repeated_to_its_share_instead_of_subsampling_the_large_one(ray_cluster, tmp_path):
    """data.max_repeats=3 with equal weights: the small source's train documents appear 3 times
    (as 3 epochs of it), and the big one gives up a quarter instead of three quarters."""
    rng = np.random.default_rng(1)
    for name, n in (("big", 600), ("sml", 150)):  # names of one length: the same bytes per token
        (tmp_path / f"{name}.txt").write_text(
            "\n\n".join(" ".join(rng.choice([f"{name}{i}" for i in range(400)], 40)) for _ in range(n))
        )
    sources = [
        {"paths": [str(tmp_path / "big.txt")], "weight": 1},
        {"paths": [str(tmp_path / "sml.txt")], "weight": 1},
    ]
    manifest, report = run_prepare(tmp_path, sources, "data.dedup.near=false", "data.max_repeats=3")
    big, small = report["sources"]["big"], report["sources"]["sml"]
    assert small["repeats"] == 3 and big["repeats"] == pytest.approx(0.75, abs=0.03)
    assert abs(small["share_achieved"] - 0.5) < 0.06 and abs(big["share_achieved"] - 0.5) < 0.06
    assert "mix_sampled_out" in big["rejects"] and "mix_sampled_out" not in small["rejects"]
    kept_small = small["stages"][-1]["docs_out"]
    assert kept_small == 150  # repeats add train tokens, not documents to the funnel
    # Train:val tokens near 3 x 0.8/0.2 = 12 for the repeated source (4 unrepeated): val is never repeated.
    assert small["tokens"]["train"] / small["tokens"]["val"] > 8
    windows = read_windows(Path(manifest.path) / "train")
    assert windows.shape[0] == manifest.splits["train"].windows
    assert WindowHash.of(windows).hexdigest() == manifest.splits["train"].content_hash
    check_funnel_adds_up(big)


def test_workers_write_one_shard_per_block_named_in_data_order(ray_cluster, tmp_path):
    """Three packing blocks of train (two passes: the second block runs to the end of pass 0)
    and one of val: the pack actors' shards, read in name order, are the windows of pass 0
    then pass 1 in input order, as streaming mode packs them, and hash to the driver's sum."""
    import ray.data
    from ray.data.expressions import col

    train_tokenizer(
        iter([["the cat sat on the mat. " * 20, "a dog ran. " * 20]]),
        TokenizerSection(vocab_size=300, min_frequency=1),
        tmp_path / "tok.json",
    )
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran"]
    rows = [
        {"text": " ".join(rng.choice(words, 12)), "source": "s", "split": "train" if i % 10 else "val"}
        | {"copies": 1 + (i % 3 == 0), "pos": i, "reason": ""}
        for i in range(2 * PACK_ROWS + 500)
    ]  # train: 7,820 documents, then 2,607 again (pass 1); 870 val
    docs = ray.data.from_items(rows, override_num_blocks=5)
    stats = encode_and_pack(docs, ["s"], tmp_path / "tok.json", 16, tmp_path / "out", ("train", "val"), passes=2)
    names = sorted(p.name for p in (tmp_path / "out" / "train").iterdir())
    assert [name.split("-")[1] for name in names] == ["0000", "0000", "0001"]
    for split in ("train", "val"):
        # The same parts packed one after another, each alone: what the shards must hold, in order.
        expected = []
        for part in kept_documents(docs, ["s"], splits=(split,), passes=2 if split == "train" else 1):
            packed = pack_stream([part], tmp_path / "tok.json", 16, 1, actors=False).filter(expr=col("split") == split)
            expected += [token_matrix(b.column("tokens")) for b in packed.iter_batches(batch_format="pyarrow")]
        expected = np.concatenate(expected)
        assert np.array_equal(read_windows(tmp_path / "out" / split), expected)
        got = stats[split]
        assert (got["windows"], got["content_hash"]) == (len(expected), WindowHash.of(expected).hexdigest())


def test_the_driver_holds_nothing_per_document(ray_cluster, tmp_path):
    """prepare's driver-side allocations (tracemalloc sees numpy arrays and Python objects) peak
    alike for 1,000 and 10,000 documents: dedup decisions, the tokenizer sample, reject samples
    and shard writes all stay on the workers. A driver-side dedup index (2.4 KB per document,
    as raylm had) would add 22 MB here; the limit allows 250 bytes per added document. At
    2,000 and 20,000 documents the peaks were 5.1 and 3.7 MB."""
    import tracemalloc

    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(5000)])
    peaks = {}
    for n in (100, 1000, 10_000):  # 100: a warm-up, so that lazy imports count for neither size
        corpus = tmp_path / f"corpus-{n}.txt"
        corpus.write_text("\n\n".join(" ".join(rng.choice(words, 40)) for _ in range(n)))
        tracemalloc.start()
        try:
            run_prepare(tmp_path / str(n), [{"paths": [str(corpus)]}])
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peaks[10_000] - peaks[1000] < 250 * 9000, peaks


def test_a_source_can_be_the_whole_validation_split(ray_cluster, tmp_path):
    """split: val holds out a whole file (the last 10% of a book, a new domain), and a
    source with split: train gives none of its documents to validation."""
    rng = np.random.default_rng(2)
    for name, n in (("main", 300), ("held", 60)):
        (tmp_path / f"{name}.txt").write_text(
            "\n\n".join(" ".join(rng.choice([f"{name}{i}" for i in range(50)], 30)) for _ in range(n))
        )
    sources = [
        {"paths": [str(tmp_path / "main.txt")], "split": "train"},
        {"paths": [str(tmp_path / "held.txt")], "split": "val"},
    ]
    manifest, _ = run_prepare(tmp_path, sources, "data.dedup.near=false")
    tok = load_tokenizer(Path(manifest.path) / "tokenizer.json")
    words = {
        split: set(tok.decode(read_windows(Path(manifest.path) / split).ravel().tolist()).split())
        for split in ("train", "val")
    }
    assert words["val"] and not any("main" in w for w in words["val"])
    assert words["train"] and not any("held" in w for w in words["train"])


def test_strict_mode_fails_naming_file_and_line(ray_cluster, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("fine text\n\nmore fine text\n")
    (data / "b.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"^\S+/b\.jsonl:2: malformed json \(data\.strict is on\)$"):
        run_prepare(tmp_path, [{"paths": [str(data)]}], "data.strict=true")


def test_rerun_reuses_output_and_redoes_a_torn_one(ray_cluster, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("\n\n".join(f"paragraph {i} about the sea and the ships" for i in range(200)))
    sources = [{"paths": [str(tmp_path / "t.txt")]}]
    first, _ = run_prepare(tmp_path, sources)
    second, _ = run_prepare(tmp_path, sources)
    assert "reusing prepared data" in capsys.readouterr().out and first == second
    cfg = load_config(
        None,
        [f"data.sources={json.dumps(sources)}", "data.seq_len=16", "tokenizer.vocab_size=300", "data.val_fraction=0.2"],
    )
    assert find_prepared(cfg.data, cfg.tokenizer, tmp_path / "out") == first
    # A run that died before writing its manifest is redone from scratch, not appended to.
    on_disk = (Path(first.path) / "manifest.json").read_text()
    assert on_disk == first.to_json() and Manifest.load(first.path) == first  # the file round-trips exactly
    (Path(first.path) / "manifest.json").unlink()
    redone, _ = run_prepare(tmp_path, sources)
    strip = lambda m: dataclasses.replace(m, seconds=None, stage_seconds={})  # noqa: E731
    assert strip(redone) == strip(first)
    assert len(read_windows(Path(redone.path) / "train")) == first.splits["train"].windows
    changed = load_config(None, [f"data.sources={json.dumps(sources)}", "data.seq_len=8"])
    with pytest.raises(DataError, match="run `raylm prepare`"):
        find_prepared(changed.data, changed.tokenizer, tmp_path / "out")


def test_path_matching_nothing_is_an_error(tmp_path):
    cfg = load_config(None, [f"data.sources=[{{paths: ['{tmp_path / 'nothing' / '*.txt'}']}}]"])
    with pytest.raises(DataError, match=r"data\.sources\.0\.paths: .* matches no readable files"):
        prepare(cfg.data, cfg.tokenizer, tmp_path / "out")


# -- without Ray: special tokens, mixing weights, pool sizes -----------------------------------


def test_special_tokens_are_trained_in_as_single_special_ids_after_eos(tmp_path):
    section = TokenizerSection(vocab_size=300, min_frequency=1, special_tokens=["<|user|>", "<|assistant|>"])
    train_tokenizer(iter([["the cat sat on the mat. " * 20, "a dog ran. " * 20]]), section, tmp_path / "tok.json")
    tok = load_tokenizer(tmp_path / "tok.json")  # as saved, the way prepare and training read it
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    assert specials == {"<|endoftext|>": 0, "<|user|>": 1, "<|assistant|>": 2} and eos_id(tok) == 0
    encoded = tok.encode("<|user|>the cat<|assistant|>a dog", add_special_tokens=False)
    assert encoded.ids[0] == 1 and encoded.tokens.count("<|assistant|>") == 1 and 2 in encoded.ids
    with pytest.raises(ValueError, match="listed more than once: <\\|user\\|>"):
        TokenizerSection(special_tokens=["<|user|>", "<|user|>"])
    with pytest.raises(
        ConfigError, match=r"tokenizer: special_tokens are trained into a new tokenizer; tokenizer\.path"
    ):
        load_config(None, ["tokenizer.path=tok.json", "tokenizer.special_tokens=[<|user|>]"])  # not silently unused


def mix_source(name: str, weight: float | None) -> Source:
    return Source(name, [f"{name}.txt"], None, "text", "text", "paragraph", weight, [])


def test_a_corpus_with_no_surviving_document_fails_before_dedup(ray_cluster, tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no document survived reading and cleaning"):
        run_prepare(tmp_path, [{"paths": [str(tmp_path / "blank.txt"), str(tmp_path / "empty.txt")]}])


def test_a_weighted_source_left_empty_fails_naming_it():
    sources = [mix_source("books", 0.7), mix_source("web", 0.3)]
    assert mixing_repeats(sources, {"books": 200.0, "web": 100.0}) == pytest.approx(
        {"books": 1.0, "web": 200 / 0.7 * 0.3 / 100}  # books, the scarcer for its weight, kept whole
    )
    cleaned_away = {"books": 200.0}  # every web document dropped by cleaning or dedup
    with pytest.raises(DataError, match=r"^data\.sources\.1 \(web\): no document left after reading, cleaning"):
        mixing_repeats(sources, cleaned_away)
    unweighted = [mix_source("books", None), mix_source("web", None)]  # natural proportions: nothing to meet
    assert mixing_repeats(unweighted, cleaned_away) == {"books": 1.0, "web": 1.0}
    # Up to 3 repeats: books, the scarcer, 3 times; web gets the same 3x output's share.
    assert mixing_repeats(sources, {"books": 200.0, "web": 100.0}, 3.0) == pytest.approx(
        {"books": 3.0, "web": min(3.0, 600 / 0.7 * 0.3 / 100)}
    )


def test_pools_are_sized_from_the_cluster_or_the_config_never_silently_one(capsys):
    assert pool_cpus({"CPU": 8.0}, ClusterSection()) == 8.0
    # An autoscaling cluster before its first worker pod (head num-cpus 0): the CPU group's most.
    group = ClusterSection(cpu={"max_nodes": 3, "cpus": 16})
    assert pool_cpus({"memory": 1e9}, group) == 48.0
    assert "cluster.cpu.max_nodes=3 x cluster.cpu.cpus=16" in capsys.readouterr().out
    for cluster in (None, ClusterSection(cpu={"max_nodes": 0})):
        with pytest.raises(ConfigError, match="the Ray cluster reports no CPUs .* cluster.cpu.max_nodes"):
            pool_cpus({"CPU": 0.0}, cluster)
