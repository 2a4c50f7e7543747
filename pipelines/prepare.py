"""`raylm prepare`: raw text -> clean documents -> BPE tokenizer -> packed token windows.

Ray Data does the per-document work across the cluster; the driver only trains the tokenizer
and writes the manifest. The output directory is keyed by a fingerprint of the config sections
and the input files, so re-running with the same inputs reuses it:

    <output_dir>/data/<fingerprint>/
        tokenizer.json
        train/*.parquet, val/*.parquet   one row per window: `tokens`, int32[seq_len + 1]
        manifest.json                    counts and baselines; written last, so it marks completion
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import shutil
import time
from collections import Counter
from itertools import chain
from pathlib import Path

import numpy as np
from ray.data.expressions import col

from . import grammar, text
from .config import DataSection, TokenizerSection, section_fingerprint
from .errors import DataError
from .runtime import cluster_cpus
from .tokenizer import eos_id, load_tokenizer, token_byte_lengths, train_tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".text"}
SPLITS = ("train", "val")


def prepare(data: DataSection, tok_cfg: TokenizerSection, output_dir: Path) -> dict:
    """Run the data pipeline (or reuse its output); returns the manifest."""
    files, reference = resolve_inputs(data, output_dir)
    out = output_dir / "data" / _fingerprint(data, tok_cfg, files)
    if (out / "manifest.json").exists():
        print(f"[prepare] reusing prepared data at {out}")
        return read_manifest(out)
    shutil.rmtree(out, ignore_errors=True)  # a run that died before its manifest left partial shards
    started = time.perf_counter()
    docs = read_documents(files, data)
    doc_stats = tally(docs, "split", ["raw_bytes", "n_bytes"])
    kept = docs.filter(expr=col("split") != "drop")
    tok_path = out / "tokenizer.json"
    tok = _get_tokenizer(kept, tok_cfg, tok_path)
    windows = {s: pack(kept.filter(expr=col("split") == s), tok_path, data.seq_len) for s in SPLITS}
    for split, ds in windows.items():
        ds.write_parquet(str(out / split))
    manifest = _manifest(data, tok_cfg, files, doc_stats, windows, tok, reference)
    manifest["seconds"] = round(time.perf_counter() - started, 2)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"[prepare] {_summary_line(manifest)} -> {out} ({manifest['seconds']} s)")
    return manifest | {"path": str(out)}


def read_manifest(prepared_dir: Path) -> dict:
    return json.loads((prepared_dir / "manifest.json").read_text()) | {"path": str(prepared_dir)}


def find_prepared(data: DataSection, tok_cfg: TokenizerSection, output_dir: Path) -> dict:
    """The manifest `prepare` wrote for these sections and inputs, for stages run alone."""
    files, _ = resolve_inputs(data, output_dir, generate=False)
    out = output_dir / "data" / _fingerprint(data, tok_cfg, files)
    if not (out / "manifest.json").exists():
        raise DataError(f"no prepared data for this config under {output_dir / 'data'}: "
                        "run `raylm prepare` with the same config first")
    return read_manifest(out)


def resolve_inputs(data: DataSection, output_dir: Path, generate: bool = True) -> tuple[list[Path], dict | None]:
    """The files to read, and the reference entropy when the corpus is the built-in grammar
    (written on first use unless generate=False)."""
    if not data.paths:
        corpus = output_dir / "corpora" / f"grammar-s{data.grammar.seed}-n{data.grammar.num_docs}"
        if not generate and not (corpus / "grammar.json").exists():
            raise DataError(f"the grammar corpus {corpus} does not exist yet: run `raylm prepare` first")
        stats = grammar.write_corpus(corpus, data.grammar.num_docs, data.grammar.seed)
        return sorted(corpus.glob("part-*.txt")), {"name": "grammar optimum", "bits_per_byte": stats["bits_per_byte"]}
    files: list[Path] = []
    for pattern in data.paths:
        matched = _expand(pattern)
        if not matched:
            raise DataError(f"data.paths: {pattern!r} matches no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
        files.extend(matched)
    return sorted(set(files)), None


def _expand(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_file():
        return [path.resolve()]
    candidates = path.rglob("*") if path.is_dir() else map(Path, glob.glob(str(path), recursive=True))
    return [p.resolve() for p in candidates if p.is_file() and p.suffix in TEXT_SUFFIXES]


def read_documents(files: list[Path], data: DataSection):
    """One row per document: text, split ("train", "val" or "drop"), raw and clean byte counts."""
    import ray.data

    ds = ray.data.read_binary_files([str(f) for f in files], include_paths=True)
    kwargs = {"boundary": data.doc_boundary, "min_chars": data.min_chars, "val_fraction": data.val_fraction}
    return ds.flat_map(text.documents_of_file, fn_kwargs=kwargs).materialize()


def tally(ds, key: str, columns: list[str]) -> dict[str, dict[str, int]]:
    """Rows and column sums per value of `key`: partial sums per block, added up on the driver."""

    def partial(batch):
        keys = batch[key]
        values = np.unique(keys)
        out = {key: values, "rows": np.array([(keys == v).sum() for v in values])}
        for col in columns:
            out[col] = np.array([batch[col][keys == v].sum() for v in values])
        return out

    totals: dict[str, Counter] = {}
    for row in ds.map_batches(partial, batch_format="numpy").iter_rows():
        totals.setdefault(str(row[key]), Counter()).update({c: int(row[c]) for c in ["rows", *columns]})
    return {k: dict(v) for k, v in sorted(totals.items())}


def _get_tokenizer(docs, cfg: TokenizerSection, path: Path):
    if cfg.path:
        source = Path(cfg.path).expanduser()
        if not source.is_file():
            raise DataError(f"tokenizer.path: {source} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(source.read_bytes())
        tok = load_tokenizer(path)
        if not any(t.special for t in tok.get_added_tokens_decoder().values()):
            raise DataError(f"tokenizer.path: {source} has no special token to use as end-of-document")
        return tok
    train_docs = docs.filter(expr=col("split") == "train")
    batches = (list(b["text"]) for b in train_docs.iter_batches(batch_size=1024, batch_format="numpy"))
    return train_tokenizer(batches, cfg, path)


class PackWindows:
    """Ray Data stateful UDF: encode documents, join them with EOS, cut windows of seq_len + 1.

    A class so each actor loads the tokenizer once. A batch's tail shorter than one window is
    dropped: with batches of 1024 documents that loses under one window per batch."""

    def __init__(self, tokenizer_path: str, seq_len: int):
        self.tok = load_tokenizer(tokenizer_path)
        self.eos = eos_id(self.tok)
        self.width = seq_len + 1

    def __call__(self, batch: dict) -> dict:
        ids = self.tok.encode_batch(list(batch["text"]), add_special_tokens=False)
        stream = np.fromiter(chain.from_iterable(e.ids + [self.eos] for e in ids), dtype=np.int32)
        n = len(stream) // self.width
        return {"tokens": stream[: n * self.width].reshape(n, self.width)}


def pack(docs, tokenizer_path: Path, seq_len: int):
    import ray.data

    # Half the CPUs to tokenizer actors (encode_batch is multi-threaded itself); the rest keep
    # the upstream read/filter tasks running. A pool that takes every CPU deadlocks on 2 cores.
    actors = max(1, int(cluster_cpus() // 2))
    return docs.map_batches(
        PackWindows,
        fn_constructor_kwargs={"tokenizer_path": str(tokenizer_path), "seq_len": seq_len},
        batch_size=1024,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    ).materialize()


def target_counts(windows, vocab_size: int) -> np.ndarray:
    """How often each token id is a prediction target (every position but the first)."""

    def count(batch):
        return {"counts": np.bincount(batch["tokens"][:, 1:].ravel(), minlength=vocab_size)[None, :]}

    total = np.zeros(vocab_size, dtype=np.int64)
    for batch in windows.map_batches(count, batch_format="numpy").iter_batches(batch_format="numpy"):
        total += batch["counts"].sum(axis=0)
    return total


def unigram_baseline(train_counts: np.ndarray, val_counts: np.ndarray, token_bytes: np.ndarray) -> dict:
    """Cross-entropy of the validation targets under the train split's token frequencies
    (add-one smoothed): the score of a model that ignores context entirely."""
    log_p = np.log((train_counts + 1) / (train_counts.sum() + len(train_counts)))
    nats = float(-(val_counts * log_p).sum())
    return {
        "nats_per_token": nats / val_counts.sum(),
        "bits_per_byte": nats / math.log(2) / float((val_counts * token_bytes).sum()),
    }


def _manifest(data, tok_cfg, files, doc_stats, windows, tok, reference) -> dict:
    vocab = tok.get_vocab_size()
    counts = {s: target_counts(ds, vocab) for s, ds in windows.items()}
    splits = {}
    for split, ds in windows.items():
        n = ds.count()
        if n == 0:
            raise DataError(f"the {split} split holds less than one window of data.seq_len={data.seq_len} tokens")
        splits[split] = {"windows": n, "tokens": n * (data.seq_len + 1), **doc_stats.get(split, {})}
    return {
        "seq_len": data.seq_len,
        "vocab_size": vocab,
        "eos_id": eos_id(tok),
        "tokenizer": "tokenizer.json",
        "files": len(files),
        "documents": doc_stats,
        "splits": splits,
        "unigram_baseline": unigram_baseline(counts["train"], counts["val"], token_byte_lengths(tok)),
        "reference": reference,
        "config": {"data": data.model_dump(mode="json"), "tokenizer": tok_cfg.model_dump(mode="json")},
    }


def _fingerprint(data: DataSection, tok_cfg: TokenizerSection, files: list[Path]) -> str:
    stamp = hashlib.sha256(section_fingerprint(data, tok_cfg).encode())
    for f in files:
        st = f.stat()
        stamp.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return stamp.hexdigest()[:12]


def _summary_line(m: dict) -> str:
    docs = sum(v["rows"] for v in m["documents"].values())
    kept = sum(m["documents"].get(s, {}).get("rows", 0) for s in SPLITS)
    tr, va = m["splits"]["train"], m["splits"]["val"]
    return (f"{m['files']} files, {kept}/{docs} documents kept, vocab {m['vocab_size']}, "
            f"train {tr['windows']} windows ({tr['tokens']:,} tokens), val {va['windows']} windows")
