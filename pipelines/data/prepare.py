"""`raylm prepare`: raw corpus -> clean, deduplicated documents -> BPE tokenizer -> packed
token windows, with a data report. Read `prepare` top to bottom.

Ray Data does the per-document work across the cluster: reading files in bounded blocks and
cleaning (readers.py, cleaning.py), dedup keys and contamination checks (dedup.py,
decontam.py), the dedup decisions as sorts and joins (judge.py), encoding and packing in an
actor pool whose actors write the shards (packing.py). The driver holds a few numbers per
block, nothing per document, and the survivor of each duplicate cluster is the same on any
cluster. Output, keyed by a fingerprint of the config sections and the input files (a rerun
with the same inputs reuses it):

    <output_dir>/data/<fingerprint>/
        tokenizer.json
        train/, val/, test/                              <split>-<pass>-<position>.npy: int32 (windows,
                                                         seq_len + 1), one per packing batch, read row by
                                                         row by training (loader.WindowStore)
        report.json, report.md, report.png               the data report
        manifest.json                                    written last: marks completion
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
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
from raylm.pipelines.data.dedup import dedup_columns, lsh_bands
from raylm.pipelines.data.judge import WHOLE, DropIndex, duplicates, position
from raylm.pipelines.data.manifest import Manifest, Reference, SplitStats, UnigramBaseline
from raylm.pipelines.data.packing import SHARD_FORMAT, SPLITS, encode_and_pack, write_train_documents
from raylm.pipelines.data.readers import (
    SNIPPET_CHARS,
    RawFile,
    file_format,
    file_stamp,
    list_source,
    read_documents,
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
        names, passes = [s.name for s in sources], math.ceil(max(verdicts.repeats.values()))
        stats = encode_and_pack(docs, names, out / "tokenizer.json", data.seq_len, out, written, passes)
        if data.streaming:
            write_train_documents(docs, names, out, passes)
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
    parts, first_file = [], 0
    for s in sources:
        # One row per file, with its number in the input order (sources in config order, files
        # sorted) for the documents' positions; each task streams its file itself, so a corrupt
        # archive is counted by readers.py instead of failing the read.
        files = [{"path": f, "file": first_file + i} for i, f in enumerate(s.files)]
        first_file += len(s.files)
        paths = ray.data.from_items(files, override_num_blocks=len(s.files))
        # Blocks of 16 MiB, not Ray's 128 MiB, up to the materialized documents: cleaning holds
        # about 6x its block. Reading and cleaning a 300 MB JSONL file peaked at 1.1 GB (private
        # RSS of the task) with 128 MiB blocks, 365 MB with 16 MiB (260 MB for a 30 MB file).
        paths.context.target_max_block_size = 16 * 2**20
        # Arrow tables per block of the file, not rows: flat_map's row-by-row block building cost
        # 3x the parse.
        parts.append(
            paths.map_batches(_parse_files, batch_size=1, batch_format="pyarrow", fn_kwargs={"source": s, "data": data})
        )
    docs = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    docs = docs.map_batches(clean_batch, fn_kwargs={"clean": data.clean}, batch_format="pyarrow")
    index = ray.put(build_index(data.decontaminate.eval_paths, data.decontaminate.ngram_words))
    docs = docs.map_batches(index_columns, fn_kwargs={"data": data, "index_ref": index}, batch_format="pyarrow")
    docs = docs.materialize()
    docs.context.target_max_block_size = ray.data.DataContext.get_current().target_max_block_size  # later stages
    return docs


def _parse_files(batch: pa.Table, source: Source, data: DataSection) -> Iterator[pa.Table]:
    """A generator: one table per block read (readers.READ_BLOCK_BYTES), so a task's memory does not
    grow with its file's size. Each row gets `pos`, its place in the input (judge.position)."""
    for path, number in zip(batch.column("path").to_pylist(), batch.column("file").to_pylist()):
        for table in _parse_file(path, source, data):
            line = table.column("line").to_numpy()
            yield table.append_column("pos", pa.array(position(np.full(len(line), number), line)))


def _parse_file(path: str, source: Source, data: DataSection) -> Iterator[pa.Table]:
    return read_documents(
        RawFile(path, source.filesystem),
        source.name,
        file_format(path, source.format),
        source.text_field,
        source.doc_boundary,
        data.clean.strip_boilerplate,
        data.clean.max_chars,
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


# -- stage 2: decide duplicates, contamination and mixing, spread over the workers --------------


@dataclass
class Verdicts:
    """What goes and how much of each source stays: the dropped duplicates as an index of
    blocks in the object store (judge.DropIndex), per-source keep fractions and contamination
    counts. The driver holds a few numbers per block and per source, none per document."""

    drops: DropIndex
    drop_contaminated: bool
    contaminated: dict[str, int]  # eval set -> kept documents that share an n-gram with it
    repeats: dict[str, float]  # source -> mean copies of each of its train documents (< 1: subsampled)


def judge(docs, data: DataSection, sources: list[Source]) -> Verdicts:
    kept = docs.filter(expr=col("reason") == "").select_columns(["pos", "exact_key", "band_keys", "signature"])
    if not kept.count():
        raise DataError("no document survived reading and cleaning: see the counts above")
    drops = DropIndex.of(duplicates(kept, data.dedup))
    survivors, contaminated = survivor_counts(docs, drops, data.decontaminate.drop)
    repeats = mixing_repeats(sources, survivors, data.max_repeats)
    return Verdicts(drops, data.decontaminate.drop, contaminated, repeats)


def survivor_counts(docs, drops: DropIndex, drop_contaminated: bool) -> tuple[dict[str, float], dict[str, int]]:
    """(source -> bytes left after dedup and decontamination, eval set -> kept documents that
    share an n-gram with it), summed per block by the workers."""
    kwargs = {"drops": drops, "drop_contaminated": drop_contaminated}
    survivors: dict[str, float] = {}
    contaminated: dict[str, int] = {}
    for batch in docs.map_batches(_count_block, fn_kwargs=kwargs, **WHOLE).iter_batches(
        batch_size=None, batch_format="pyarrow"
    ):
        for kind, name, value in zip(*(batch.column(c).to_pylist() for c in ("kind", "name", "value"))):
            if kind == "bytes":
                survivors[name] = survivors.get(name, 0.0) + value
            else:
                contaminated[name] = contaminated.get(name, 0) + int(value)
    return survivors, contaminated


def _count_block(batch: pa.Table, drops: DropIndex, drop_contaminated: bool) -> pa.Table:
    kept = np.flatnonzero(batch.column("reason").to_numpy(zero_copy_only=False) == "")
    contaminated = batch.column("contaminated").to_numpy(zero_copy_only=False)[kept]
    reasons = _dedup_reasons(batch.column("pos").to_numpy()[kept], contaminated, drops, drop_contaminated)
    sources = batch.column("source").to_numpy(zero_copy_only=False)[kept]
    sizes = as_matrix(batch.column("bytes_after"))[kept, -1]
    rows = [("bytes", name, float(sizes[(sources == name) & (reasons == "")].sum())) for name in set(sources)]
    sets = collections.Counter(name for names in contaminated for name in names.split(",") if name)
    rows += [("contaminated", name, count) for name, count in sets.items()]
    kinds, names, values = zip(*rows) if rows else ((), (), ())
    strings = {"kind": pa.array(kinds, pa.string()), "name": pa.array(names, pa.string())}
    return pa.table({**strings, "value": pa.array(values, pa.float64())})


def _dedup_reasons(pos: np.ndarray, contaminated: np.ndarray, drops: DropIndex, drop_contaminated: bool) -> np.ndarray:
    """Why each kept document goes ("" stays): exact, then near duplicate, then contamination."""
    reasons = drops.reasons(pos)
    if drop_contaminated:
        reasons[(reasons == "") & (contaminated != "")] = "contaminated"
    return reasons


def mixing_repeats(sources: list[Source], available: dict[str, float], max_repeats: float = 1.0) -> dict[str, float]:
    """Mean copies per document that give each source its weight's share of the output bytes,
    from each source's bytes left after dedup and decontamination. The scarcest source relative
    to its weight is repeated max_repeats times (kept whole at 1); the others get what their
    weight asks of that output: repeated up to max_repeats, or subsampled. A weighted source
    with nothing left would make every share zero: that fails here, naming it."""
    if all(s.weight is None for s in sources):
        return {s.name: 1.0 for s in sources}
    avail = {s.name: float(available.get(s.name, 0.0)) for s in sources}
    empty = [f"data.sources.{i} ({s.name})" for i, s in enumerate(sources) if not avail[s.name]]
    if empty:
        raise DataError(
            f"{', '.join(empty)}: no document left after reading, cleaning, dedup and decontamination, so "
            "its mixing weight cannot be met and every source would be sampled out to nothing: "
            "fix its paths, format or text_field, loosen data.clean, or remove the source"
        )
    total_w = sum(s.weight for s in sources)
    output = max_repeats * min(avail[s.name] / (s.weight / total_w) for s in sources)
    return {s.name: min(max_repeats, output * s.weight / total_w / avail[s.name]) for s in sources}


# -- stage 3: apply verdicts, split, subsample ------------------------------------------------------


def finalize(docs, verdicts: Verdicts, data: DataSection):
    fixed = {source_name(s.paths, s.name): s.split for s in data.sources if s.split != "auto"}
    kwargs = {"verdicts": verdicts, "val": data.val_fraction, "test": data.test_fraction, "fixed": fixed}
    drop = ["exact_key", "band_keys", "signature"]
    return docs.map_batches(_apply_verdicts, fn_kwargs=kwargs, **WHOLE).drop_columns(drop).materialize()


def _apply_verdicts(batch: pa.Table, verdicts: Verdicts, val: float, test: float, fixed: dict[str, str]) -> pa.Table:
    v = verdicts
    reasons = batch.column("reason").to_numpy(zero_copy_only=False).astype(object)
    kept = np.flatnonzero(reasons == "")
    contaminated = batch.column("contaminated").to_numpy(zero_copy_only=False)[kept]
    reasons[kept] = _dedup_reasons(batch.column("pos").to_numpy()[kept], contaminated, v.drops, v.drop_contaminated)
    texts, sources = batch.column("text").to_pylist(), batch.column("source").to_numpy(zero_copy_only=False)
    splits, copies = np.full(batch.num_rows, "", dtype=object), np.zeros(batch.num_rows, np.int32)
    for i in kept[reasons[kept] == ""]:
        copies[i] = _copies(texts[i], v.repeats[sources[i]])
        if not copies[i]:
            reasons[i] = "mix_sampled_out"
        else:
            splits[i] = fixed.get(sources[i]) or assign_split(texts[i], val, test)
            copies[i] = copies[i] if splits[i] == "train" else 1  # evaluation data is never repeated
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
    return batch.append_column("split", pa.array(splits, pa.string())).append_column("copies", pa.array(copies))


def _copies(text: str, repeats: float) -> int:
    """floor(repeats) copies, and one more for a hash-chosen fraction of the documents: 2.5
    gives half of them 2 and half 3, 0.4 keeps 40% once (the same 40% on every cluster)."""
    whole = int(repeats)
    return whole + (_unit_hash(text, salt=b"mix") < repeats - whole)


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
    """The first few rejected documents of each reason, in input order: where they are and how
    they start. Each block offers its first `per_reason` per reason; the driver keeps the first."""
    rejected = docs.filter(expr=(col("reason") != "")).select_columns(
        ["pos", "source", "path", "line", "reason", "snippet"]
    )
    offered = rejected.map_batches(_first_rejects, fn_kwargs={"per_reason": per_reason}, **WHOLE)
    candidates = sorted(offered.iter_rows(), key=lambda row: (row["reason"], row["pos"]))
    samples: dict[str, list[dict]] = {}
    for row in candidates:
        bucket = samples.setdefault(row["reason"], [])
        if len(bucket) < per_reason and not row["reason"].startswith("fixed:"):
            bucket.append({k: v for k, v in row.items() if k != "pos"})
    return [row for bucket in samples.values() for row in bucket]


def _first_rejects(block: pa.Table, per_reason: int) -> pa.Table:
    reason, pos = block.column("reason").to_numpy(zero_copy_only=False), block.column("pos").to_numpy()
    order = np.lexsort([pos, reason])
    ordered = reason[order]
    starts = np.r_[0, np.flatnonzero(ordered[1:] != ordered[:-1]) + 1] if len(order) else np.zeros(0, int)
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    return block.take(pa.array(np.sort(order[rank < per_reason])))


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
    if fraction < 1:  # drawn by the workers
        train = train.map_batches(_bpe_sample, fn_kwargs={"fraction": fraction}, batch_format="pyarrow")
    # Trained in a task, not the driver: the BPE trainer's word counts over sample_bytes (200 MB
    # by default) take gigabytes, and the head node is the smallest. The task reads the sample
    # block by block from the object store and returns tokenizer.json's text.
    blocks = train.materialize().to_arrow_refs()
    path.write_text(ray.get(_train_tokenizer_task.remote(blocks, section)))
    return load_tokenizer(path)


@ray.remote(num_cpus=1)  # the trainer's threads use the node's other cores as well
def _train_tokenizer_task(blocks: list, section: TokenizerSection) -> str:
    def batches():
        for ref in blocks:
            texts = ray.get(ref).column("text").to_pylist()
            for start in range(0, len(texts), 4096):
                yield texts[start : start + 4096]

    with tempfile.TemporaryDirectory() as tmp:
        return train_tokenizer(batches(), section, Path(tmp) / "tokenizer.json").to_str(pretty=True)


def _bpe_sample(batch: pa.Table, fraction: float) -> pa.Table:
    keep = [_unit_hash(t, salt=b"bpe") < fraction for t in batch.column("text").to_pylist()]
    return batch.filter(pa.array(keep, pa.bool_()))


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
