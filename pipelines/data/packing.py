"""Encoding and packing documents into training windows, with Ray Data, and writing them.

Packing runs on blocks of exactly PACK_ROWS documents, split after split, so the windows do
not depend on how a cluster cuts the data into blocks: any cluster, and streaming mode during
training, packs the same windows.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data import SaveMode
from ray.data.datasource import FilenameProvider
from ray.data.expressions import col, lit

from raylm.pipelines.data.arrays import as_fixed_list
from raylm.pipelines.data.manifest import Manifest
from raylm.pipelines.data.tokenizer import eos_id, load_tokenizer, token_byte_lengths
from raylm.pipelines.runtime import cluster_cpus

SPLITS = ("train", "val", "test")
PACK_ROWS = 4096  # documents per packing batch: each split's last partial window per batch is counted, not kept
TRAIN_DOCS = "train_docs"  # streaming mode: the kept train documents, packed while training
SHARD_BYTES = 64 * 2**20  # a shard file holds about this much token data
# In the prepared data's fingerprint, so no output of another layout is reused (npy-1: shards cut
# by one writer on the driver, a sha256 content hash; npy-2: a shard per packing block).
SHARD_FORMAT = "npy-2"


class EncodeAndPack:
    """Ray Data stateful UDF: the tokenizer is loaded once per actor (encode_batch runs in Rust
    threads, so one actor keeps several cores busy). Per split, the batch's documents are
    joined with EOS and cut into windows; each window records how many of its tokens and
    bytes came from each source. The tail shorter than a window is counted, not kept.

    Without `out` (streaming mode) it returns the windows, the tail as a row with split
    "<split>:tail" (padded with -1). With `out` (prepare) it writes each split's windows of
    the batch as one shard, <out>/<split>/<key>.npy, for the splits in `write`, and returns
    one summary row per split (counts, WindowHash, target-token counts, per-source sums): the
    windows never leave the worker, and the driver adds up a few numbers per batch. The key
    is the batch's first document of that split, (pass, position), so sorting the names puts
    the shards in data order on any cluster, and a retried task rewrites the same file."""

    def __init__(self, tokenizer_path: str, width: int, n_sources: int, out: str | None = None, write=()):
        tok = load_tokenizer(tokenizer_path)
        self.tok, self.eos, self.width, self.n_sources = tok, eos_id(tok), width, n_sources
        self.token_bytes = token_byte_lengths(tok)
        self.out, self.write = out, tuple(write)

    def __call__(self, batch: pa.Table) -> pa.Table:
        pieces = self._pack(batch)
        if self.out is not None:
            return pa.Table.from_pylist([self._write_shard(batch, p) for p in pieces], schema=SUMMARY_SCHEMA)
        if not pieces:
            return self._table(np.zeros((0, self.width), np.int32), [], np.zeros(0), np.zeros(0))
        return pa.concat_tables([self._rows(p) for p in pieces])

    def _rows(self, p: Piece) -> pa.Table:
        return self._table(p.windows, [p.split] * p.full + [f"{p.split}:tail"], p.src_tokens, p.src_bytes)

    def _pack(self, batch: pa.Table) -> list[Piece]:
        # encode_batch_fast skips the character offsets raylm never uses: 4.7 vs 5.1 s (mean of 3)
        # for the benchmark corpus in 4096-document batches; a small gain next to the noise.
        encodings = self.tok.encode_batch_fast(batch.column("text").to_pylist(), add_special_tokens=False)
        eos = np.array([self.eos], np.int32)
        ids = np.concatenate(
            [a for e in encodings for a in (np.array(e.ids, np.int32), eos)] or [np.zeros(0, np.int32)]
        )
        lengths = np.array([len(e.ids) + 1 for e in encodings])
        # Splits as small integer codes per token: np.unique over 4M token-level strings cost 2 s
        # of the 6 s this call took on the benchmark corpus.
        labels = batch.column("split").to_numpy(zero_copy_only=False)
        names, first, codes = np.unique(labels, return_index=True, return_inverse=True)
        token_split = np.repeat(codes, lengths)
        token_source = np.repeat(batch.column("source_index").to_numpy(), lengths)
        return [
            self._windows(ids[token_split == i], token_source[token_split == i], str(s), int(first[i]))
            for i, s in enumerate(names)
        ]

    def _windows(self, stream: np.ndarray, source: np.ndarray, split: str, first_row: int) -> Piece:
        n = len(stream) // self.width
        tail = np.full(self.width, -1, np.int32)
        tail[: len(stream) - n * self.width] = stream[n * self.width :]
        windows = np.vstack([stream[: n * self.width].reshape(n, self.width), tail[None, :]])
        row = np.minimum(np.arange(len(stream)) // self.width, n)  # window of each token; n = tail
        flat = row * self.n_sources + source
        src_tokens = np.bincount(flat, minlength=(n + 1) * self.n_sources).reshape(n + 1, self.n_sources)
        src_bytes = np.bincount(flat, weights=self.token_bytes[stream], minlength=(n + 1) * self.n_sources)
        return Piece(split, first_row, n, windows, src_tokens, src_bytes.reshape(n + 1, self.n_sources))

    def _write_shard(self, batch: pa.Table, p: Piece) -> dict:
        key = shard_key(p.split, batch.column("pass")[p.first_row].as_py(), batch.column("pos")[p.first_row].as_py())
        full = p.windows[: p.full]
        if p.split in self.write and p.full:
            save_shard(Path(self.out) / p.split / f"{key}.npy", full)
        target_counts = np.bincount(full[:, 1:].ravel())
        target_ids = np.flatnonzero(target_counts)
        return {
            "split": p.split,
            "windows": p.full,
            "tokens": int(full.size),
            "tail_tokens_dropped": int((p.windows[p.full] >= 0).sum()),
            "hash": WindowHash.of(full).value,
            "target_ids": target_ids,
            "target_counts": target_counts[target_ids],
            "source_tokens": p.src_tokens.sum(axis=0).astype(np.int64),
            "source_bytes": p.src_bytes.sum(axis=0).astype(np.int64),
        }

    def _table(self, windows, splits, src_tokens, src_bytes) -> pa.Table:
        return pa.table(
            {
                "tokens": as_fixed_list(windows),
                "split": pa.array(splits, pa.string()),
                "source_tokens": as_fixed_list(np.asarray(src_tokens, np.int64).reshape(len(splits), -1)),
                "source_bytes": as_fixed_list(np.asarray(src_bytes, np.int64).reshape(len(splits), -1)),
            }
        )


@dataclass
class Piece:
    """One split's windows from one packing batch: `full` whole windows, then the tail (padded
    with -1) as the last row; per row, the tokens and bytes from each source."""

    split: str
    first_row: int  # the batch row of the split's first document
    full: int
    windows: np.ndarray
    src_tokens: np.ndarray
    src_bytes: np.ndarray


SUMMARY_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("windows", pa.int64()),
        ("tokens", pa.int64()),
        ("tail_tokens_dropped", pa.int64()),
        ("hash", pa.uint64()),
        ("target_ids", pa.list_(pa.int64())),
        ("target_counts", pa.list_(pa.int64())),
        ("source_tokens", pa.list_(pa.int64())),
        ("source_bytes", pa.list_(pa.int64())),
    ]
)


def shard_key(split: str, pass_index: int, pos: int) -> str:
    """A shard's name: fixed-width hex, so name order is (pass, position) order."""
    return f"{split}-{pass_index:04x}-{pos:016x}"


def save_shard(path: Path, windows: np.ndarray) -> None:
    """Written to a temporary name and renamed, so a shard on disk is always whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as f:
        np.save(f, np.ascontiguousarray(windows, dtype=np.int32))
    os.replace(partial, path)


class WindowHash:
    """An order-free hash of a collection of windows: the sum of each window's 8-byte blake2b,
    mod 2^64, with their count. Workers hash the shards they write, the driver adds the sums,
    and streaming mode's windows give the same value in whatever order Ray streams them; the
    order of the stored windows is fixed by the shard names."""

    MOD = 2**64

    def __init__(self, value: int = 0, count: int = 0):
        self.value, self.count = value, count

    @classmethod
    def of(cls, windows: np.ndarray) -> WindowHash:
        return cls().update(windows)

    def update(self, windows: np.ndarray) -> WindowHash:
        for row in np.ascontiguousarray(windows, dtype=np.int32):
            self.value += int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "big")
        self.value %= self.MOD
        self.count += len(windows)
        return self

    def add(self, value: int, count: int) -> WindowHash:
        self.value, self.count = (self.value + value) % self.MOD, self.count + count
        return self

    def hexdigest(self) -> str:
        return f"{self.value:016x}"


def kept_documents(docs, source_names: list[str], splits: tuple[str, ...] = SPLITS, passes: int = 1) -> list:
    """The surviving documents as parts, one per split and pass over it (train first), each in
    input order, with their source as an index into `sources` and their pass. A repeated
    source's train documents come again in later passes over train (pass k: those with more
    than k copies), as epochs of that source would."""
    kept = docs.filter(expr=col("reason") == "").select_columns(["text", "source", "split", "copies", "pos"])
    kept = kept.map_batches(_with_source_index, fn_kwargs={"names": source_names}, batch_format="pyarrow")
    parts = []
    for split in splits:
        for k in range(passes) if split == "train" else range(1):
            part = kept.filter(expr=(col("split") == split) & (col("copies") > k))
            parts.append(part.with_column("pass", lit(k)).drop_columns(["copies"]))
    return parts


def packing_blocks(parts: list):
    """Blocks of exactly PACK_ROWS documents (each part's last one shorter), none spanning two
    parts, so that the windows depend neither on the cluster's block layout nor on how Ray
    orders a union: Ray 2.60 interleaves the parts' blocks round robin, not one part after
    the other, so a block cut from the union would mix splits and passes."""
    blocks = [p.repartition(target_num_rows_per_block=PACK_ROWS, strict=True) for p in parts]
    return blocks[0].union(*blocks[1:]) if len(blocks) > 1 else blocks[0]


def pack_stream(parts: list, tokenizer_path: Path, seq_len: int, n_sources: int, actors=True, out=None, write=()):
    """Lazy windows of every split from the parts of kept documents (or with `out`, their
    summaries, the shards written there: EncodeAndPack). Whole blocks are the batches
    (batch_size=None): batches of PACK_ROWS rows would run across the short last block of a part.

    actors=True (prepare): an actor pool, each actor loading the tokenizer once. Half the CPUs
    go to encoders (each also runs Rust threads); the rest keep upstream tasks going (a pool
    that takes every CPU starves its own input on 2 cores). actors=False (inside training,
    which holds most CPUs): plain tasks, which a reserved actor cannot block; the tokenizer is
    then loaded once per worker process."""
    blocks = packing_blocks(parts)
    packer = {"tokenizer_path": str(tokenizer_path), "width": seq_len + 1, "n_sources": n_sources}
    if not actors:
        assert out is None, "plain tasks pack for streaming mode, which writes nothing"
        return blocks.map_batches(_pack_task, fn_kwargs=packer, batch_size=None, batch_format="pyarrow")
    return blocks.map_batches(
        EncodeAndPack,
        fn_constructor_kwargs={**packer, "out": None if out is None else str(out), "write": tuple(write)},
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=max(1, int(cluster_cpus() // 2))),
        num_cpus=1,
    )


@lru_cache(maxsize=4)
def _packer(tokenizer_path: str, width: int, n_sources: int) -> EncodeAndPack:
    return EncodeAndPack(tokenizer_path, width, n_sources)


def _pack_task(batch: pa.Table, tokenizer_path: str, width: int, n_sources: int) -> pa.Table:
    return _packer(tokenizer_path, width, n_sources)(batch)


def encode_and_pack(
    docs,
    source_names: list[str],
    tokenizer_path: Path,
    seq_len: int,
    out: Path,
    write: tuple[str, ...],
    passes: int = 1,
) -> dict:
    """Pack the kept documents on the workers, which write the splits named in `write` as shards
    under `out`; per-split statistics for the manifest, summed on the driver from one small
    row per split and packing batch."""
    parts = kept_documents(docs, source_names, passes=passes)
    summaries = pack_stream(parts, tokenizer_path, seq_len, len(source_names), out=out, write=write)
    return collect_summaries(summaries, len(source_names))


def collect_summaries(summaries, n_sources: int) -> dict[str, dict]:
    """Per split: windows, tokens, tail tokens dropped, the WindowHash of the windows,
    target-token counts, and tokens and bytes per source (the achieved mix), added up from
    the workers' rows as they come: the driver holds the sums, nothing per shard or document."""
    stats = {
        s: {
            "windows": 0,
            "tokens": 0,
            "tail_tokens_dropped": 0,
            "target_counts": np.zeros(0, np.int64),
            "source_tokens": np.zeros(n_sources, np.int64),
            "source_bytes": np.zeros(n_sources, np.int64),
        }
        for s in SPLITS
    }
    hashes = {s: WindowHash() for s in SPLITS}
    for batch in summaries.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            st = stats[row["split"]]
            for k in ("windows", "tokens", "tail_tokens_dropped"):
                st[k] += row[k]
            ids = np.asarray(row["target_ids"], np.int64)
            if len(ids) and ids[-1] >= len(st["target_counts"]):
                st["target_counts"] = np.pad(st["target_counts"], (0, int(ids[-1]) + 1 - len(st["target_counts"])))
            st["target_counts"][ids] += np.asarray(row["target_counts"], np.int64)
            st["source_tokens"] += np.asarray(row["source_tokens"], np.int64)
            st["source_bytes"] += np.asarray(row["source_bytes"], np.int64)
            hashes[row["split"]].add(row["hash"], row["windows"])
    for split, st in stats.items():
        st["content_hash"] = hashes[split].hexdigest()
    return stats


def write_train_documents(docs, source_names: list[str], out: Path, passes: int = 1) -> None:
    """Streaming mode keeps the cleaned train documents instead of their windows: one directory
    per pass, <out>/train_docs/pass-0000/, ..., so training packs the same blocks prepare did."""
    for k, part in enumerate(kept_documents(docs, source_names, splits=("train",), passes=passes)):
        part.write_parquet(
            str(out / TRAIN_DOCS / f"pass-{k:04d}"),
            filename_provider=ShardNames("docs"),
            mode=SaveMode.OVERWRITE,
            min_rows_per_file=PACK_ROWS * 64,
        )


def stream_train_windows(manifest: Manifest):
    """Streaming mode: the train windows, packed on the fly from the kept documents by Ray Data
    (the same windows prepare would have written), for TorchTrainer's `datasets`."""
    prepared = Path(manifest.path)
    parts = [ray.data.read_parquet(str(d)) for d in sorted((prepared / TRAIN_DOCS).glob("pass-*"))]
    n_sources = len(manifest.sources)
    windows = pack_stream(parts, prepared / manifest.tokenizer, manifest.seq_len, n_sources, actors=False)
    return windows.filter(expr=col("split") == "train").select_columns(["tokens"])


def _with_source_index(batch: pa.Table, names: list[str]) -> pa.Table:
    index = {name: i for i, name in enumerate(names)}
    return batch.append_column(
        "source_index", pa.array([index[x] for x in batch.column("source").to_pylist()], pa.int32())
    )


class ShardNames(FilenameProvider):
    def __init__(self, split: str):
        super().__init__(file_format="parquet")
        self.split = split

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        # Sorted by name, the shards are in write-task order, which is the data order.
        return f"{self.split}-{task_index:05d}.parquet"


class ShardWriter:
    """One split's windows, in data order, as <split>/<split>-00000.npy, ... of about
    SHARD_BYTES each: int32 arrays (N, seq_len + 1), or (N, 3, seq_len + 1) for fine-tuning
    windows (sft.py), that loader.WindowStore memory-maps. Rows are appended as they come and
    the .npy header is rewritten with the row count on close, so the writer holds one batch.
    For fine-tuning data (sft.py) and tests; prepare's workers write a shard per packing batch
    (EncodeAndPack)."""

    def __init__(self, directory: Path):
        self.directory, self.index, self.rows, self.file = directory, 0, 0, None
        self.row_shape: tuple[int, ...] = ()
        self.data_start = 0  # the header's length: where the rows begin

    def write(self, windows: np.ndarray) -> None:
        if not len(windows):
            return
        if self.file is None:
            self._open(windows.shape[1:])
        elif windows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.directory}: rows of shape {windows.shape[1:]} after {self.row_shape}")
        self.file.write(np.ascontiguousarray(windows, dtype=np.int32).data)
        self.rows += len(windows)
        if self.file.tell() - self.data_start >= SHARD_BYTES:
            self.close()

    def _open(self, row_shape: tuple[int, ...]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.file = open(self.directory / f"{self.directory.name}-{self.index:05d}.npy", "wb")
        self.row_shape = row_shape
        self._write_header()
        self.data_start = self.file.tell()

    def _write_header(self) -> None:
        # numpy pads the header for a row count of up to 21 digits (GROWTH_AXIS_MAX_DIGITS), so
        # the header rewritten on close is exactly as long as the one written at open.
        np.lib.format.write_array_header_1_0(
            self.file, {"descr": "<i4", "fortran_order": False, "shape": (self.rows, *self.row_shape)}
        )

    def close(self) -> None:
        if self.file is None:
            return
        self.file.seek(0)
        self._write_header()
        if self.file.tell() != self.data_start:
            raise RuntimeError(f"{self.file.name}: the .npy header changed length when rewritten")
        self.file.close()
        self.file, self.rows, self.index = None, 0, self.index + 1
