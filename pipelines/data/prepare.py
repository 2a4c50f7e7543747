"""`raylm prepare`: raw corpus -> clean, deduplicated documents -> BPE tokenizer -> packed
token windows, with a data report. Read `prepare` top to bottom.

Ray Data does the per-document work across the cluster: reading and cleaning (readers.py,
cleaning.py), dedup keys and contamination checks (dedup.py, decontam.py), encoding in an
actor pool and packing (packing.py). The driver holds one small index to decide which duplicates go, so
the survivor of each cluster is the same on any cluster. Output, keyed by a fingerprint of
the config sections and the input files (a rerun with the same inputs reuses it):

    <output_dir>/data/<fingerprint>/
        tokenizer.json
        train/, val/, test/                              <split>-00000.npy ...: int32 (windows, seq_len + 1),
                                                         memory-mapped by training (loader.WindowStore)
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
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.expressions import col

from raylm.config import DataSection, TokenizerSection, section_fingerprint
from raylm.errors import DataError
from raylm.pipelines.data import grammar
from raylm.pipelines.data.arrays import as_fixed_list, as_matrix
from raylm.pipelines.data.cleaning import TRANSFORMS, assign_split, clean_batch
from raylm.pipelines.data.decontam import build_index, contaminating_sets
from raylm.pipelines.data.dedup import dedup_columns, first_of_each, lsh_bands, near_duplicates
from raylm.pipelines.data.manifest import Manifest, Reference, SplitStats, UnigramBaseline
from raylm.pipelines.data.packing import SHARD_FORMAT, SPLITS, encode_and_pack, write_train_documents
from raylm.pipelines.data.readers import (
    DOCUMENT_SCHEMA,
    SNIPPET_CHARS,
    documents_of_file,
    file_format,
    file_stamp,
    list_source,
    source_name,
)
from raylm.pipelines.data.report import READ_REASONS, build_report, write_report
from raylm.pipelines.data.tokenizer import eos_id, load_tokenizer, token_byte_lengths, train_tokenizer

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


def prepare(data: DataSection, tok_cfg: TokenizerSection, output_dir: Path) -> Manifest:
    """Run the data pipeline (or reuse its output); returns the manifest."""
    sources, reference = resolve_sources(data, output_dir)
    out = output_dir / "data" / _fingerprint(data, tok_cfg, sources)
    if (out / "manifest.json").exists():
        print(f"[prepare] reusing prepared data at {out}")
        return Manifest.load(out)
    shutil.rmtree(out, ignore_errors=True)  # a run that died before its manifest left partial shards
    clock = StageClock()
    with clock("read + clean") as seen:
        docs = read_and_clean(sources, data)
        seen["rows"] = docs.count()
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
    with clock("encode + pack + write") as seen:
        # Streaming mode stores the train documents (packed again while training), not their windows.
        written = tuple(s for s in SPLITS if not (s == "train" and data.streaming))
        stats = encode_and_pack(docs, [s.name for s in sources], out / "tokenizer.json", data.seq_len, out, written)
        if data.streaming:
            write_train_documents(docs, [s.name for s in sources], out)
        seen["tokens"] = sum(int(st["source_tokens"].sum()) for st in stats.values())

    report = build_report(sources, doc_counts, stats, verdicts, tok, samples, data)
    manifest = _manifest(data, tok_cfg, sources, stats, tok, reference, report, clock, out)
    write_report(report, out)
    manifest.write(out)
    print(f"[prepare] {_summary_line(manifest)} -> {out} ({manifest.seconds} s)")
    return manifest


def find_prepared(data: DataSection, tok_cfg: TokenizerSection, output_dir: Path) -> Manifest:
    """The manifest `prepare` wrote for these sections and inputs, for stages run alone."""
    sources, _ = resolve_sources(data, output_dir, generate=False)
    out = output_dir / "data" / _fingerprint(data, tok_cfg, sources)
    if not (out / "manifest.json").exists():
        raise DataError(
            f"no prepared data for this config under {output_dir / 'data'}: "
            "run `raylm prepare` with the same config first"
        )
    return Manifest.load(out)


# -- inputs ------------------------------------------------------------------------------------


def resolve_sources(
    data: DataSection, output_dir: Path, generate: bool = True
) -> tuple[list[Source], Reference | None]:
    """The sources with their files, and the reference entropy for the built-in grammar corpus
    (written on first use unless generate=False). A path matching no file is an error."""
    if not data.sources:
        return [_grammar_source(data, output_dir, generate)], _grammar_reference(data, output_dir)
    sources = []
    for i, s in enumerate(data.sources):
        files, ignored, filesystem = [], [], None
        for pattern in s.paths:
            matched, skipped, filesystem = list_source(pattern, f"data.sources.{i}.paths")
            files, ignored = files + matched, ignored + skipped
        sources.append(
            Source(
                source_name(s.paths, s.name),
                sorted(set(files)),
                filesystem,
                s.format,
                s.text_field,
                s.doc_boundary,
                s.weight,
                sorted(set(ignored)),
            )
        )
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"data.sources: names must be unique, got {names}; set `name` on each source")
    return sources, None


def _grammar_dir(data: DataSection, output_dir: Path) -> Path:
    return output_dir / "corpora" / f"grammar-s{data.grammar.seed}-n{data.grammar.num_docs}"


def _grammar_source(data: DataSection, output_dir: Path, generate: bool) -> Source:
    corpus = _grammar_dir(data, output_dir)
    if not (corpus / "grammar.json").exists():
        if not generate:
            raise DataError(f"the grammar corpus {corpus} does not exist yet: run `raylm prepare` first")
        grammar.write_corpus(corpus, data.grammar.num_docs, data.grammar.seed)
    return Source(
        "grammar", sorted(str(p) for p in corpus.glob("part-*.txt")), None, "text", "text", "paragraph", None, []
    )


def _grammar_reference(data: DataSection, output_dir: Path) -> Reference:
    stats = json.loads((_grammar_dir(data, output_dir) / "grammar.json").read_text())
    return Reference("grammar optimum", stats["bits_per_byte"])


# -- stage 1: read and clean --------------------------------------------------------------------


def read_and_clean(sources: list[Source], data: DataSection):
    """One row per document (and per rejected piece of input) with its cleaning record."""
    parts = []
    for s in sources:
        # One row per file; each task reads its files' raw bytes itself, so a corrupt archive is
        # counted by readers.py instead of failing the read (Ray's reader decompresses .gz).
        paths = ray.data.from_items([{"path": f} for f in s.files], override_num_blocks=len(s.files))
        # Arrow tables per file, not rows: flat_map's row-by-row block building cost 3x the parse.
        parts.append(
            paths.map_batches(_parse_files, batch_size=1, batch_format="pyarrow", fn_kwargs={"source": s, "data": data})
        )
    docs = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    docs = docs.map_batches(clean_batch, fn_kwargs={"clean": data.clean}, batch_format="pyarrow")
    index = ray.put(build_index(data.decontaminate.eval_paths, data.decontaminate.ngram_words))
    return docs.map_batches(
        index_columns, fn_kwargs={"data": data, "index_ref": index}, batch_format="pyarrow"
    ).materialize()


def _parse_files(batch: pa.Table, source: Source, data: DataSection) -> pa.Table:
    rows = [doc for path in batch.column("path").to_pylist() for doc in _parse_file(path, source, data)]
    return pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA)


def _parse_file(path: str, source: Source, data: DataSection) -> list[dict]:
    if source.filesystem is None:
        raw = Path(path).read_bytes()
    else:
        with source.filesystem.open_input_file(path) as f:  # raw bytes: no codec guessing
            raw = f.readall()
    fmt = file_format(path, source.format)
    return documents_of_file(
        {"path": path, "bytes": raw},
        source.name,
        fmt,
        source.text_field,
        source.doc_boundary,
        data.clean.strip_boilerplate,
    )


def index_columns(batch: pa.Table, data: DataSection, index_ref) -> pa.Table:
    """Exact key, MinHash signature and band keys, and contaminating eval sets per kept document."""
    d, n = data.dedup, batch.num_rows
    kept = np.flatnonzero(batch.column("reason").to_numpy(zero_copy_only=False) == "")
    texts = batch.column("text").take(kept)
    bands = d.bands or lsh_bands(d.num_perm, d.threshold)
    cols = dedup_columns(texts, d.num_perm, bands, d.shingle_words, d.exact, d.near)
    exact, sig, keys = (
        np.zeros(n, np.int64),
        np.zeros((n, d.num_perm if d.near else 1), np.uint32),
        np.zeros((n, bands), np.int64),
    )
    exact[kept] = cols["exact_key"]
    if d.near:
        sig[kept], keys[kept] = cols["signature"], cols["band_keys"]
    contaminated = np.full(n, "", dtype=object)
    index = ray.get(index_ref)  # zero-copy from the object store: one copy per node
    if index and len(kept):
        contaminated[kept] = contaminating_sets(texts, index, data.decontaminate.ngram_words)
    return (
        batch.append_column("exact_key", pa.array(exact))
        .append_column("signature", as_fixed_list(sig))
        .append_column("band_keys", as_fixed_list(keys))
        .append_column("contaminated", pa.array(contaminated, pa.string()))
    )


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
    table = pa.concat_tables(list(kept.iter_batches(batch_size=None, batch_format="pyarrow")))
    if table.num_rows == 0:
        raise DataError("no document survived reading and cleaning: see the counts above")
    contaminated = table.column("contaminated").to_numpy(zero_copy_only=False)
    reasons = np.full(table.num_rows, "", dtype=object)
    if data.dedup.exact:
        reasons[first_of_each(table.column("exact_key").to_numpy())] = "exact_duplicate"
    if data.dedup.near:
        alive = np.flatnonzero(reasons == "")
        bands, sigs = as_matrix(table.column("band_keys"))[alive], as_matrix(table.column("signature"))[alive]
        reasons[alive[near_duplicates(bands, sigs, data.dedup.threshold)]] = "near_duplicate"
    if data.decontaminate.drop:
        reasons[(reasons == "") & (contaminated != "")] = "contaminated"
    doc_sources = table.column("source").to_numpy(zero_copy_only=False)
    keep = mixing_fractions(sources, doc_sources, as_matrix(table.column("bytes_after"))[:, -1], reasons == "")
    ids = table.column("doc_id").to_numpy()
    order = np.argsort(ids)
    return Verdicts(ids[order], reasons[order], _count_contaminated(contaminated), keep)


def _count_contaminated(column: np.ndarray) -> dict[str, int]:
    counts: dict[str, int] = {}
    for names in column:
        for name in filter(None, names.split(",")):
            counts[name] = counts.get(name, 0) + 1
    return counts


def mixing_fractions(
    sources: list[Source], doc_sources: np.ndarray, doc_bytes: np.ndarray, alive: np.ndarray
) -> dict[str, float]:
    """Keep probabilities that give each source its weight's share of the output bytes.
    The scarcest source relative to its weight is kept whole; the others are subsampled. A
    weighted source with nothing left would make every share zero: that fails here, naming it."""
    if all(s.weight is None for s in sources):
        return {s.name: 1.0 for s in sources}
    avail = {s.name: float(doc_bytes[alive & (doc_sources == s.name)].sum()) for s in sources}
    empty = [f"data.sources.{i} ({s.name})" for i, s in enumerate(sources) if not avail[s.name]]
    if empty:
        raise DataError(
            f"{', '.join(empty)}: no document left after reading, cleaning, dedup and decontamination, so "
            "its mixing weight cannot be met and every source would be sampled out to nothing: "
            "fix its paths, format or text_field, loosen data.clean, or remove the source"
        )
    total_w = sum(s.weight for s in sources)
    output = min(avail[s.name] / (s.weight / total_w) for s in sources)
    return {s.name: min(1.0, output * s.weight / total_w / avail[s.name]) for s in sources}


# -- stage 3: apply verdicts, split, subsample ------------------------------------------------------


def finalize(docs, verdicts: Verdicts, data: DataSection):
    fixed = {source_name(s.paths, s.name): s.split for s in data.sources if s.split != "auto"}
    kwargs = {"verdicts": ray.put(verdicts), "val": data.val_fraction, "test": data.test_fraction, "fixed": fixed}
    drop = ["exact_key", "band_keys", "signature"]
    return docs.map_batches(_apply_verdicts, fn_kwargs=kwargs, batch_format="pyarrow").drop_columns(drop).materialize()


def _apply_verdicts(batch: pa.Table, verdicts, val: float, test: float, fixed: dict[str, str]) -> pa.Table:
    v: Verdicts = ray.get(verdicts)
    reasons = batch.column("reason").to_numpy(zero_copy_only=False).astype(object)
    kept = np.flatnonzero(reasons == "")
    reasons[kept] = v.reasons[np.searchsorted(v.ids, batch.column("doc_id").to_numpy()[kept])]
    texts, sources = batch.column("text").to_pylist(), batch.column("source").to_numpy(zero_copy_only=False)
    splits = np.full(batch.num_rows, "", dtype=object)
    for i in kept[reasons[kept] == ""]:
        if _unit_hash(texts[i], salt=b"mix") >= v.keep_fraction[sources[i]]:
            reasons[i] = "mix_sampled_out"
        else:
            splits[i] = fixed.get(sources[i]) or assign_split(texts[i], val, test)
    dropped = pa.array((reasons != "") & (batch.column("reason").to_numpy(zero_copy_only=False) == ""))
    text = batch.column("text").combine_chunks()
    snippet = pc.if_else(
        dropped, pc.utf8_slice_codeunits(text, 0, SNIPPET_CHARS), batch.column("snippet").combine_chunks()
    )
    batch = batch.set_column(batch.schema.get_field_index("snippet"), "snippet", snippet)
    batch = batch.set_column(
        batch.schema.get_field_index("text"), "text", pc.if_else(pa.array(reasons != ""), "", text)
    )
    batch = batch.set_column(batch.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
    return batch.append_column("split", pa.array(splits, pa.string()))


def _unit_hash(text: str, salt: bytes) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, salt=salt).digest(), "big") / 2**64


def tally(docs) -> dict[str, dict]:
    """Counts per (source, reason, split): rows, raw bytes, and bytes after each transform.
    Arrow group-by per block, added up on the driver."""
    after = [f"after_{i}" for i in range(len(TRANSFORMS))]

    def partial(batch: pa.Table) -> pa.Table:
        sizes = as_matrix(batch.column("bytes_after"))
        table = pa.table(
            {
                "source": batch.column("source"),
                "reason": batch.column("reason"),
                "split": batch.column("split"),
                "raw_bytes": batch.column("raw_bytes"),
                **{a: sizes[:, i] for i, a in enumerate(after)},
            }
        )
        sums = table.group_by(["source", "reason", "split"]).aggregate(
            [("raw_bytes", "count"), ("raw_bytes", "sum"), *[(a, "sum") for a in after]]
        )
        return sums

    totals: dict[str, dict] = {}
    for row in docs.map_batches(partial, batch_format="pyarrow").iter_rows():
        t = totals.setdefault(
            f"{row['source']}\t{row['reason']}\t{row['split']}",
            {"rows": 0, "raw_bytes": 0, "bytes_after": np.zeros(len(TRANSFORMS), np.int64)},
        )
        t["rows"] += row["raw_bytes_count"]
        t["raw_bytes"] += row["raw_bytes_sum"]
        t["bytes_after"] = t["bytes_after"] + np.array([row[f"{a}_sum"] for a in after])
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


# -- stage 4: tokenizer, then encode and pack --------------------------------------------------------


def get_tokenizer(docs, train_bytes: int, section: TokenizerSection, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    if section.path:
        source = Path(section.path).expanduser()
        if not source.is_file():
            raise DataError(f"tokenizer.path: {source} does not exist")
        path.write_bytes(source.read_bytes())
        tok = load_tokenizer(path)
        if not any(t.special for t in tok.get_added_tokens_decoder().values()):
            raise DataError(f"tokenizer.path: {source} has no special token to use as end-of-document")
        return tok
    train = docs.filter(expr=col("split") == "train").select_columns(["text"])
    fraction = min(1.0, section.sample_bytes / max(1, train_bytes))  # a deterministic sample by content hash
    batches = (b.column("text").to_pylist() for b in train.iter_batches(batch_size=4096, batch_format="pyarrow"))
    if fraction < 1:
        batches = ([t for t in texts if _unit_hash(t, salt=b"bpe") < fraction] for texts in batches)
    return train_tokenizer(batches, section, path)


# -- manifest ---------------------------------------------------------------------------------------


class StageClock:
    """Times each stage and prints one progress line per stage (no progress-bar redraws)."""

    def __init__(self):
        self.started, self.seconds = time.perf_counter(), {}

    @contextmanager
    def __call__(self, name: str):
        """The stage may put counts in the yielded dict; the line shows them with their rate."""
        t0, counts = time.perf_counter(), {}
        yield counts
        seconds = time.perf_counter() - t0
        self.seconds[name] = round(seconds, 2)
        rates = "".join(f" | {n:,} {what} ({n / seconds:,.0f}/s)" for what, n in counts.items())
        print(f"[prepare] {name}: {seconds:.1f} s{rates}", flush=True)

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 2)


def unigram_baseline(train_counts: np.ndarray, val_counts: np.ndarray, token_bytes: np.ndarray) -> UnigramBaseline:
    """Cross-entropy of the validation targets under the train split's token frequencies
    (add-one smoothed): the score of a model that ignores context entirely."""
    vocab = len(token_bytes)
    train_counts, val_counts = (np.pad(c, (0, vocab - len(c))) for c in (train_counts, val_counts))
    log_p = np.log((train_counts + 1) / (train_counts.sum() + vocab))
    nats = float(-(val_counts * log_p).sum())
    return UnigramBaseline(
        nats_per_token=nats / val_counts.sum(),
        bits_per_byte=nats / np.log(2) / float((val_counts * token_bytes).sum()),
    )


def _manifest(data, tok_cfg, sources, stats, tok, reference, report, clock, out: Path) -> Manifest:
    for split in ("train", "val"):
        if stats[split]["windows"] == 0:
            raise DataError(f"the {split} split holds less than one window of data.seq_len={data.seq_len} tokens")
    keys = ("windows", "tokens", "tail_tokens_dropped", "content_hash")
    baseline = unigram_baseline(stats["train"]["target_counts"], stats["val"]["target_counts"], token_byte_lengths(tok))
    return Manifest(
        path=str(out),
        seq_len=data.seq_len,
        streaming=data.streaming,  # train windows are packed while training, not stored
        vocab_size=tok.get_vocab_size(),
        eos_id=eos_id(tok),
        tokenizer="tokenizer.json",
        files=sum(len(s.files) for s in sources),
        splits={split: SplitStats(**{k: st[k] for k in keys}) for split, st in stats.items()},
        sources=report["sources"],
        unigram_baseline=baseline,
        reference=reference,
        stage_seconds=clock.seconds,
        seconds=clock.total(),
        config={"data": data.model_dump(mode="json"), "tokenizer": tok_cfg.model_dump(mode="json")},
        inputs_fingerprint=_inputs_fingerprint(sources),
    )


def _inputs_fingerprint(sources: list[Source]) -> str:
    stamp = hashlib.sha256()
    for s in sources:
        for f in s.files:
            size, mtime = file_stamp(f, s.filesystem)
            stamp.update(f"{s.name}:{f}:{size}:{mtime}".encode())
    return stamp.hexdigest()[:12]


def _fingerprint(data: DataSection, tok_cfg: TokenizerSection, sources: list[Source]) -> str:
    # SHARD_FORMAT: data prepared in another shard layout (Parquet before "npy-1") is not reused.
    key = f"{section_fingerprint(data, tok_cfg)}:{_inputs_fingerprint(sources)}:{SHARD_FORMAT}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _summary_line(m: Manifest) -> str:
    tr, va = m.splits["train"], m.splits["val"]
    return (
        f"{m.files} files, vocab {m.vocab_size}, train {tr.windows} windows ({tr.tokens:,} tokens), "
        f"val {va.windows} windows"
    )
