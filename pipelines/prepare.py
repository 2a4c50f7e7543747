"""`raylm prepare`: raw corpus -> clean, deduplicated documents -> BPE tokenizer -> packed
token windows, with a data report. Read `prepare` top to bottom.

Ray Data does the per-document work across the cluster: reading and cleaning (readers.py,
cleaning.py), dedup keys and contamination checks (dedup.py, decontam.py), encoding in an
actor pool and packing. The driver holds one small index to decide which duplicates go, so
the survivor of each cluster is the same on any cluster. Output, keyed by a fingerprint of
the config sections and the input files (a rerun with the same inputs reuses it):

    <output_dir>/data/<fingerprint>/
        tokenizer.json
        train/*.parquet, val/*.parquet, test/*.parquet   rows: `tokens`, int32[seq_len + 1]
        report.json, report.md, report.png               the data report
        manifest.json                                    written last: marks completion
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data import SaveMode
from ray.data.datasource import FilenameProvider
from ray.data.expressions import col

from . import grammar
from .cleaning import TRANSFORMS, assign_split, clean_batch
from .config import DataSection, TokenizerSection, section_fingerprint
from .data_report import READ_REASONS, build_report, write_report
from .decontam import build_index, contaminating_sets
from .dedup import band_keys, exact_key, first_of_each, lsh_bands, minhash, near_duplicates, permutations, shingles
from .errors import DataError
from .readers import documents_of_file, file_format, list_files, source_name
from .runtime import cluster_cpus
from .tokenizer import eos_id, load_tokenizer, token_byte_lengths, train_tokenizer

SPLITS = ("train", "val", "test")
PACK_ROWS = 1024  # documents per packing batch: each drops its last partial window
STRICT_REASONS = (*READ_REASONS, "too_long")  # corrupt input; other drops are policy


@dataclass
class Source:
    name: str
    files: list[str]
    filesystem: object  # pyarrow FileSystem for URIs, None for local paths
    format: str
    text_field: str
    doc_boundary: str
    weight: float | None
    ignored: list[str]  # files in the given directories/globs without a readable suffix


def prepare(data: DataSection, tok_cfg: TokenizerSection, output_dir: Path) -> dict:
    """Run the data pipeline (or reuse its output); returns the manifest."""
    sources, reference = resolve_sources(data, output_dir)
    out = output_dir / "data" / _fingerprint(data, tok_cfg, sources)
    if (out / "manifest.json").exists():
        print(f"[prepare] reusing prepared data at {out}")
        return read_manifest(out)
    shutil.rmtree(out, ignore_errors=True)  # a run that died before its manifest left partial shards
    clock = StageClock()
    with clock("read + clean"):
        docs = read_and_clean(sources, data)
        if data.strict:
            refuse_bad_input(docs)
    with clock("dedup + decontaminate"):
        verdicts = judge(docs, data, sources)
    with clock("split + mix"):
        docs = finalize(docs, verdicts, data)
        doc_counts, samples = tally(docs), reject_samples(docs, data.reject_samples)
    with clock("tokenizer"):
        train_bytes = sum(int(c["bytes_after"][-1]) for key, c in doc_counts.items() if key.endswith("\ttrain"))
        tok = get_tokenizer(docs, train_bytes, tok_cfg, out / "tokenizer.json")
    with clock("encode"):
        encoded = encode(docs, out / "tokenizer.json")
        token_counts = tally_tokens(encoded)
    with clock("pack + write"):
        windows = {split: pack_and_write(encoded, split, data.seq_len, out) for split in SPLITS}

    report = build_report(sources, doc_counts, token_counts, verdicts, windows, tok, samples, data)
    manifest = _manifest(data, tok_cfg, sources, windows, tok, reference, report, clock)
    write_report(report, out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"[prepare] {_summary_line(manifest)} -> {out} ({manifest['seconds']} s)")
    return manifest | {"path": str(out)}


def read_manifest(prepared_dir: Path) -> dict:
    return json.loads((prepared_dir / "manifest.json").read_text()) | {"path": str(prepared_dir)}


def find_prepared(data: DataSection, tok_cfg: TokenizerSection, output_dir: Path) -> dict:
    """The manifest `prepare` wrote for these sections and inputs, for stages run alone."""
    sources, _ = resolve_sources(data, output_dir, generate=False)
    out = output_dir / "data" / _fingerprint(data, tok_cfg, sources)
    if not (out / "manifest.json").exists():
        raise DataError(f"no prepared data for this config under {output_dir / 'data'}: "
                        "run `raylm prepare` with the same config first")
    return read_manifest(out)


# -- inputs ------------------------------------------------------------------------------------


def resolve_sources(data: DataSection, output_dir: Path, generate: bool = True) -> tuple[list[Source], dict | None]:
    """The sources with their files, and the reference entropy for the built-in grammar corpus
    (written on first use unless generate=False). A path matching no file is an error."""
    if not data.sources:
        return [_grammar_source(data, output_dir, generate)], _grammar_reference(data, output_dir)
    sources = []
    for i, s in enumerate(data.sources):
        files, ignored, filesystem = [], [], None
        for pattern in s.paths:
            matched, skipped, filesystem = _list(pattern, f"data.sources.{i}.paths")
            files, ignored = files + matched, ignored + skipped
        sources.append(Source(source_name(s.paths, s.name), sorted(set(files)), filesystem, s.format,
                              s.text_field, s.doc_boundary, s.weight, sorted(set(ignored))))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"data.sources: names must be unique, got {names}; set `name` on each source")
    return sources, None


def _list(pattern: str, key: str):
    try:
        files, ignored, filesystem = list_files(pattern)
    except (OSError, ValueError, ImportError) as err:
        raise DataError(f"{key}: cannot list {pattern!r}: {err}") from None
    if not files:
        raise DataError(f"{key}: {pattern!r} matches no readable files (.txt .md .jsonl .parquet, optionally .gz/.zst)")
    return files, ignored, filesystem


def _grammar_dir(data: DataSection, output_dir: Path) -> Path:
    return output_dir / "corpora" / f"grammar-s{data.grammar.seed}-n{data.grammar.num_docs}"


def _grammar_source(data: DataSection, output_dir: Path, generate: bool) -> Source:
    corpus = _grammar_dir(data, output_dir)
    if not (corpus / "grammar.json").exists():
        if not generate:
            raise DataError(f"the grammar corpus {corpus} does not exist yet: run `raylm prepare` first")
        grammar.write_corpus(corpus, data.grammar.num_docs, data.grammar.seed)
    return Source("grammar", sorted(str(p) for p in corpus.glob("part-*.txt")), None, "text", "text", "paragraph", None, [])


def _grammar_reference(data: DataSection, output_dir: Path) -> dict:
    stats = json.loads((_grammar_dir(data, output_dir) / "grammar.json").read_text())
    return {"name": "grammar optimum", "bits_per_byte": stats["bits_per_byte"]}


# -- stage 1: read and clean --------------------------------------------------------------------


def read_and_clean(sources: list[Source], data: DataSection):
    """One row per document (and per rejected piece of input) with its cleaning record."""
    parts = []
    for s in sources:
        # One row per file; each task reads its files' raw bytes itself, so a corrupt archive is
        # counted by readers.py instead of failing the read (Ray's reader decompresses .gz).
        paths = ray.data.from_items([{"path": f} for f in s.files], override_num_blocks=len(s.files))
        parts.append(paths.flat_map(_parse_file, fn_kwargs={"source": s, "data": data}))
    docs = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    docs = docs.map_batches(clean_batch, fn_kwargs={"cfg": data.clean}, batch_format="numpy")
    index = ray.put(build_index(data.decontaminate.eval_paths, data.decontaminate.ngram_words))
    return docs.map_batches(index_columns, fn_kwargs={"data": data, "index_ref": index}, batch_format="numpy").materialize()


def _parse_file(row: dict, source: Source, data: DataSection) -> list[dict]:
    path = row["path"]
    if source.filesystem is None:
        raw = Path(path).read_bytes()
    else:
        with source.filesystem.open_input_file(path) as f:  # raw bytes: no codec guessing
            raw = f.readall()
    fmt = file_format(path, source.format)
    return documents_of_file({"path": path, "bytes": raw}, source.name, fmt, source.text_field,
                             source.doc_boundary, data.clean.strip_boilerplate)


def index_columns(batch: dict, data: DataSection, index_ref) -> dict:
    """Dedup keys, MinHash band keys and signature, and contaminating eval sets per document."""
    d = data.dedup
    n, bands = len(batch["text"]), d.bands or lsh_bands(d.num_perm, d.threshold)
    a, b = permutations(d.num_perm)
    index = ray.get(index_ref)  # zero-copy from the object store: one copy per node
    exact = np.zeros(n, dtype=np.int64)
    keys = np.zeros((n, bands), dtype=np.int64)
    sigs = np.zeros((n, d.num_perm if d.near else 1), dtype=np.uint32)
    contaminated = [""] * n
    for i, (text, reason) in enumerate(zip(batch["text"], batch["reason"])):
        if reason:
            continue
        exact[i] = exact_key(text)
        if d.near:
            sigs[i] = minhash(shingles(text, d.shingle_words), a, b)
            keys[i] = band_keys(sigs[i], bands)
        if index:
            contaminated[i] = ",".join(contaminating_sets(text, index, data.decontaminate.ngram_words))
    return {**batch, "exact_key": exact, "band_keys": keys, "signature": sigs,
            "contaminated": np.array(contaminated, dtype=object)}


def refuse_bad_input(docs) -> None:
    """Strict mode: the first corrupt piece of input, in input order, fails the run."""
    bad = docs.filter(expr=col("reason").is_in(list(STRICT_REASONS))).select_columns(["path", "line", "reason"])
    first = bad.take(1)
    if first:
        row = first[0]
        raise DataError(f"{row['path']}:{row['line']}: {row['reason'].replace('_', ' ')} (data.strict is on)")


# -- stage 2: decide duplicates, contamination and mixing on the driver ------------------------------


@dataclass
class Verdicts:
    """Per kept document id, the reason it goes ("" stays), and each source's keep fraction."""

    ids: np.ndarray  # sorted int64 doc ids of all documents that survived cleaning
    reasons: np.ndarray  # object array aligned with ids
    contaminated: dict[str, int]  # eval set -> documents that share an n-gram with it
    keep_fraction: dict[str, float]  # source -> sampling probability for the mixing weights


def judge(docs, data: DataSection, sources: list[Source]) -> Verdicts:
    cols = ["doc_id", "source", "exact_key", "band_keys", "signature", "contaminated", "bytes_after"]
    kept = docs.filter(expr=col("reason") == "").select_columns(cols)
    batches = list(kept.iter_batches(batch_size=None, batch_format="numpy"))
    if not batches:
        raise DataError("no document survived reading and cleaning: see the counts above")
    get = {c: np.concatenate([b[c] for b in batches]) for c in cols}
    reasons = np.full(len(get["doc_id"]), "", dtype=object)
    if data.dedup.exact:
        reasons[first_of_each(get["exact_key"])] = "exact_duplicate"
    if data.dedup.near:
        alive = np.flatnonzero(reasons == "")
        reasons[alive[near_duplicates(get["band_keys"][alive], get["signature"][alive], data.dedup.threshold)]] = "near_duplicate"
    contaminated = _count_contaminated(get["contaminated"])
    if data.decontaminate.drop:
        reasons[(reasons == "") & (get["contaminated"] != "")] = "contaminated"
    keep_fraction = mixing_fractions(sources, get["source"], get["bytes_after"][:, -1], reasons == "")
    order = np.argsort(get["doc_id"])
    return Verdicts(get["doc_id"][order], reasons[order], contaminated, keep_fraction)


def _count_contaminated(column: np.ndarray) -> dict[str, int]:
    counts: dict[str, int] = {}
    for names in column:
        for name in filter(None, names.split(",")):
            counts[name] = counts.get(name, 0) + 1
    return counts


def mixing_fractions(sources: list[Source], doc_sources: np.ndarray, doc_bytes: np.ndarray, alive: np.ndarray) -> dict[str, float]:
    """Keep probabilities that give each source its weight's share of the output bytes.
    The scarcest source relative to its weight is kept whole; the others are subsampled."""
    if all(s.weight is None for s in sources):
        return {s.name: 1.0 for s in sources}
    avail = {s.name: float(doc_bytes[alive & (doc_sources == s.name)].sum()) for s in sources}
    total_w = sum(s.weight for s in sources)
    output = min(avail[s.name] / (s.weight / total_w) for s in sources)
    return {s.name: min(1.0, output * s.weight / total_w / avail[s.name]) if avail[s.name] else 1.0 for s in sources}


# -- stage 3: apply verdicts, split, subsample ------------------------------------------------------


def finalize(docs, verdicts: Verdicts, data: DataSection):
    kwargs = {"verdicts": ray.put(verdicts), "val": data.val_fraction, "test": data.test_fraction}
    return docs.map_batches(_apply_verdicts, fn_kwargs=kwargs, batch_format="numpy").materialize()


def _apply_verdicts(batch: dict, verdicts, val: float, test: float) -> dict:
    v: Verdicts = ray.get(verdicts)
    reasons, texts = list(batch["reason"]), list(batch["text"])
    splits = [""] * len(reasons)
    for i, (doc, text) in enumerate(zip(batch["doc_id"], texts)):
        if reasons[i]:
            continue
        reasons[i] = v.reasons[np.searchsorted(v.ids, doc)]
        if not reasons[i] and _unit_hash(text, salt=b"mix") >= v.keep_fraction[batch["source"][i]]:
            reasons[i] = "mix_sampled_out"
        if reasons[i]:
            texts[i] = ""
        else:
            splits[i] = assign_split(text, val, test)
    drop = ["exact_key", "band_keys", "signature"]
    return {**{k: c for k, c in batch.items() if k not in drop}, "reason": np.array(reasons, dtype=object),
            "text": np.array(texts, dtype=object), "split": np.array(splits, dtype=object)}


def _unit_hash(text: str, salt: bytes) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, salt=salt).digest(), "big") / 2**64


def tally(docs) -> dict[str, dict]:
    """Counts per (source, reason, split): rows, raw bytes, and bytes after each transform.
    Partial sums per block, added up on the driver."""
    def partial(batch):
        keys = np.array([f"{s}\t{r}\t{p}" for s, r, p in zip(batch["source"], batch["reason"], batch["split"])], dtype=object)
        uniq = np.unique(keys)
        return {"key": uniq,
                "rows": np.array([(keys == k).sum() for k in uniq]),
                "raw_bytes": np.array([batch["raw_bytes"][keys == k].sum() for k in uniq]),
                "bytes_after": np.stack([batch["bytes_after"][keys == k].sum(axis=0) for k in uniq])}

    totals: dict[str, dict] = {}
    for b in docs.map_batches(partial, batch_format="numpy").iter_batches(batch_size=None, batch_format="numpy"):
        for key, rows, raw, after in zip(b["key"], b["rows"], b["raw_bytes"], b["bytes_after"]):
            t = totals.setdefault(key, {"rows": 0, "raw_bytes": 0, "bytes_after": np.zeros(len(TRANSFORMS), np.int64)})
            t["rows"] += int(rows)
            t["raw_bytes"] += int(raw)
            t["bytes_after"] = t["bytes_after"] + after
    return totals


def reject_samples(docs, per_reason: int) -> list[dict]:
    """The first few rejected documents of each reason: where they are and how they start."""
    rejected = docs.filter(expr=col("reason") != "").select_columns(["source", "path", "line", "reason", "snippet"])
    samples: dict[str, list[dict]] = {}
    for row in rejected.iter_rows():
        bucket = samples.setdefault(row["reason"], [])
        if len(bucket) < per_reason and not row["reason"].startswith("fixed:"):
            bucket.append(dict(row))
    return [row for bucket in samples.values() for row in bucket]


# -- stage 4: tokenizer, encoding, packing ---------------------------------------------------------


def get_tokenizer(docs, train_bytes: int, cfg: TokenizerSection, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    if cfg.path:
        source = Path(cfg.path).expanduser()
        if not source.is_file():
            raise DataError(f"tokenizer.path: {source} does not exist")
        path.write_bytes(source.read_bytes())
        tok = load_tokenizer(path)
        if not any(t.special for t in tok.get_added_tokens_decoder().values()):
            raise DataError(f"tokenizer.path: {source} has no special token to use as end-of-document")
        return tok
    train = docs.filter(expr=col("split") == "train").select_columns(["text"])
    fraction = min(1.0, cfg.sample_bytes / max(1, train_bytes))  # a deterministic sample by content hash
    sample = train.filter(lambda row: _unit_hash(row["text"], salt=b"bpe") < fraction) if fraction < 1 else train
    batches = (list(b["text"]) for b in sample.iter_batches(batch_size=1024, batch_format="numpy"))
    return train_tokenizer(batches, cfg, path)


class EncodeDocuments:
    """Ray Data stateful UDF: the tokenizer is loaded once per actor; encode_batch runs in
    Rust threads, so one actor already keeps several cores busy."""

    def __init__(self, tokenizer_path: str):
        self.tok = load_tokenizer(tokenizer_path)
        self.eos = eos_id(self.tok)

    def __call__(self, batch: dict) -> pa.Table:
        encodings = self.tok.encode_batch(list(batch["text"]), add_special_tokens=False)
        lengths = np.array([len(e.ids) + 1 for e in encodings], dtype=np.int32)
        values = np.empty(int(lengths.sum()), dtype=np.int32)
        ends = np.cumsum(lengths)
        for e, end in zip(encodings, ends):
            values[end - len(e.ids) - 1 : end - 1] = e.ids
        values[ends - 1] = self.eos  # every document ends with EOS
        offsets = np.concatenate([[0], ends]).astype(np.int32)
        return pa.table({
            "source": pa.array(batch["source"], pa.string()), "split": pa.array(batch["split"], pa.string()),
            "ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
            "n_tokens": pa.array(lengths), "n_bytes": pa.array(batch["bytes_after"][:, -1]),
        })


def encode(docs, tokenizer_path: Path):
    kept = docs.filter(expr=col("reason") == "")
    # Half the CPUs to encoder actors (encode_batch is multi-threaded itself); the rest keep
    # the upstream tasks running. A pool that takes every CPU deadlocks on 2 cores.
    actors = max(1, int(cluster_cpus() // 2))
    return kept.map_batches(
        EncodeDocuments, fn_constructor_kwargs={"tokenizer_path": str(tokenizer_path)},
        batch_size=1024, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
    ).materialize()


def tally_tokens(encoded) -> dict[str, dict[str, int]]:
    totals: dict[str, dict[str, int]] = {}
    for b in encoded.select_columns(["source", "split", "n_tokens", "n_bytes"]).iter_batches(batch_size=None, batch_format="numpy"):
        for source, split, n_tok, n_b in zip(b["source"], b["split"], b["n_tokens"], b["n_bytes"]):
            t = totals.setdefault(f"{source}\t{split}", {"docs": 0, "tokens": 0, "bytes": 0})
            t["docs"] += 1
            t["tokens"] += int(n_tok)
            t["bytes"] += int(n_b)
    return totals


def pack_windows(batch: pa.Table, width: int) -> dict:
    """Join the documents' tokens (each ends with EOS) and cut windows of `width` tokens."""
    stream = batch.column("ids").combine_chunks().flatten().to_numpy()
    n = len(stream) // width
    return {"tokens": stream[: n * width].reshape(n, width)}


class ShardNames(FilenameProvider):
    def __init__(self, split: str):
        super().__init__(file_format="parquet")
        self.split = split

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        # Sorted by name, the shards are in write-task order, which is the data order.
        return f"{self.split}-{task_index:05d}.parquet"


def pack_and_write(encoded, split: str, seq_len: int, out: Path) -> dict:
    """Pack one split into windows of seq_len + 1 and write them; returns its window stats.
    Blocks of exactly PACK_ROWS documents make the windows independent of the cluster's
    block layout, so any cluster writes the same windows."""
    docs = encoded.filter(expr=col("split") == split).select_columns(["ids"])
    docs = docs.repartition(target_num_rows_per_block=PACK_ROWS, strict=True)
    windows = docs.map_batches(pack_windows, fn_kwargs={"width": seq_len + 1}, batch_size=PACK_ROWS, batch_format="pyarrow")
    # OVERWRITE: the directory is new (prepare clears it), and fixed names need this mode.
    windows.write_parquet(str(out / split), filename_provider=ShardNames(split), mode=SaveMode.OVERWRITE)
    return window_stats(out / split, seq_len)


def window_stats(split_dir: Path, seq_len: int) -> dict:
    """Windows, tokens, target-token counts and a content hash of the split as training reads it."""
    from .loader import read_windows  # the same reader the trainer uses

    windows = read_windows(split_dir) if any(split_dir.glob("*.parquet")) else np.zeros((0, seq_len + 1), np.int32)
    return {"windows": len(windows), "tokens": int(windows.size),
            "content_hash": hashlib.sha256(windows.tobytes()).hexdigest()[:16],
            "target_counts": np.bincount(windows[:, 1:].ravel()) if len(windows) else np.zeros(0, np.int64)}


# -- manifest ---------------------------------------------------------------------------------------


class StageClock:
    """Times each stage and prints one progress line per stage (no progress-bar redraws)."""

    def __init__(self):
        self.started, self.seconds = time.perf_counter(), {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        print(f"[prepare] {name}: {self.seconds[name]:.1f} s", flush=True)

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 2)


def unigram_baseline(train_counts: np.ndarray, val_counts: np.ndarray, token_bytes: np.ndarray) -> dict:
    """Cross-entropy of the validation targets under the train split's token frequencies
    (add-one smoothed): the score of a model that ignores context entirely."""
    vocab = len(token_bytes)
    train_counts, val_counts = (np.pad(c, (0, vocab - len(c))) for c in (train_counts, val_counts))
    log_p = np.log((train_counts + 1) / (train_counts.sum() + vocab))
    nats = float(-(val_counts * log_p).sum())
    return {"nats_per_token": nats / val_counts.sum(), "bits_per_byte": nats / np.log(2) / float((val_counts * token_bytes).sum())}


def _manifest(data, tok_cfg, sources, windows, tok, reference, report, clock) -> dict:
    for split in ("train", "val"):
        if windows[split]["windows"] == 0:
            raise DataError(f"the {split} split holds less than one window of data.seq_len={data.seq_len} tokens")
    splits = {s: {k: v for k, v in w.items() if k != "target_counts"} for s, w in windows.items()}
    baseline = unigram_baseline(windows["train"]["target_counts"], windows["val"]["target_counts"], token_byte_lengths(tok))
    return {
        "seq_len": data.seq_len,
        "vocab_size": tok.get_vocab_size(),
        "eos_id": eos_id(tok),
        "tokenizer": "tokenizer.json",
        "files": sum(len(s.files) for s in sources),
        "splits": splits,
        "sources": report["sources"],
        "unigram_baseline": baseline,
        "reference": reference,
        "stage_seconds": clock.seconds,
        "seconds": clock.total(),
        "config": {"data": data.model_dump(mode="json"), "tokenizer": tok_cfg.model_dump(mode="json")},
        "inputs_fingerprint": _inputs_fingerprint(sources),
    }


def _inputs_fingerprint(sources: list[Source]) -> str:
    stamp = hashlib.sha256()
    for s in sources:
        for f in s.files:
            info = s.filesystem.get_file_info(f) if s.filesystem else None
            size, mtime = (info.size, info.mtime_ns) if info else (Path(f).stat().st_size, Path(f).stat().st_mtime_ns)
            stamp.update(f"{s.name}:{f}:{size}:{mtime}".encode())
    return stamp.hexdigest()[:12]


def _fingerprint(data: DataSection, tok_cfg: TokenizerSection, sources: list[Source]) -> str:
    return hashlib.sha256(f"{section_fingerprint(data, tok_cfg)}:{_inputs_fingerprint(sources)}".encode()).hexdigest()[:12]


def _summary_line(m: dict) -> str:
    tr, va = m["splits"]["train"], m["splits"]["val"]
    return (f"{m['files']} files, vocab {m['vocab_size']}, train {tr['windows']} windows ({tr['tokens']:,} tokens), "
            f"val {va['windows']} windows")
