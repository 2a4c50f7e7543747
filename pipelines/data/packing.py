"""Encoding and packing documents into training windows, with Ray Data, and writing them.

Packing runs on blocks of exactly PACK_ROWS documents, split after split, so the windows do
not depend on how a cluster cuts the data into blocks: any cluster, and streaming mode during
training, packs the same windows.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data import SaveMode
from ray.data.datasource import FilenameProvider
from ray.data.expressions import col

from raylm.pipelines.data.arrays import as_fixed_list, as_matrix
from raylm.pipelines.data.manifest import Manifest
from raylm.pipelines.data.tokenizer import eos_id, load_tokenizer, token_byte_lengths
from raylm.pipelines.runtime import cluster_cpus

SPLITS = ("train", "val", "test")
PACK_ROWS = 4096  # documents per packing batch: each split's last partial window per batch is counted, not kept
TRAIN_DOCS = "train_docs"  # streaming mode: the kept train documents, packed while training
SHARD_BYTES = 64 * 2**20  # a shard file holds about this much token data
SHARD_FORMAT = "npy-1"  # in the prepared data's fingerprint, so no output of another layout is reused


class EncodeAndPack:
    """Ray Data stateful UDF: the tokenizer is loaded once per actor (encode_batch runs in Rust
    threads, so one actor keeps several cores busy). Per split, the batch's documents are
    joined with EOS and cut into windows; each window records how many of its tokens and
    bytes came from each source. The tail shorter than a window becomes a row with split
    "<split>:tail" (padded with -1), so the token accounting stays complete."""

    def __init__(self, tokenizer_path: str, width: int, n_sources: int):
        tok = load_tokenizer(tokenizer_path)
        self.tok, self.eos, self.width, self.n_sources = tok, eos_id(tok), width, n_sources
        self.token_bytes = token_byte_lengths(tok)

    def __call__(self, batch: pa.Table) -> pa.Table:
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
        names, codes = np.unique(batch.column("split").to_numpy(zero_copy_only=False), return_inverse=True)
        token_split = np.repeat(codes, lengths)
        token_source = np.repeat(batch.column("source_index").to_numpy(), lengths)
        parts = [self._windows(ids[token_split == i], token_source[token_split == i], s) for i, s in enumerate(names)]
        return (
            pa.concat_tables(parts)
            if parts
            else self._table(np.zeros((0, self.width), np.int32), [], np.zeros(0), np.zeros(0))
        )

    def _windows(self, stream: np.ndarray, source: np.ndarray, split: str) -> pa.Table:
        n = len(stream) // self.width
        tail = np.full(self.width, -1, np.int32)
        tail[: len(stream) - n * self.width] = stream[n * self.width :]
        windows = np.vstack([stream[: n * self.width].reshape(n, self.width), tail[None, :]])
        row = np.minimum(np.arange(len(stream)) // self.width, n)  # window of each token; n = tail
        flat = row * self.n_sources + source
        src_tokens = np.bincount(flat, minlength=(n + 1) * self.n_sources).reshape(n + 1, self.n_sources)
        src_bytes = np.bincount(flat, weights=self.token_bytes[stream], minlength=(n + 1) * self.n_sources)
        return self._table(
            windows, [split] * n + [f"{split}:tail"], src_tokens, src_bytes.reshape(n + 1, self.n_sources)
        )

    def _table(self, windows, splits, src_tokens, src_bytes) -> pa.Table:
        return pa.table(
            {
                "tokens": as_fixed_list(windows),
                "split": pa.array(splits, pa.string()),
                "source_tokens": as_fixed_list(np.asarray(src_tokens, np.int64).reshape(len(splits), -1)),
                "source_bytes": as_fixed_list(np.asarray(src_bytes, np.int64).reshape(len(splits), -1)),
            }
        )


def kept_documents(docs, source_names: list[str], splits: tuple[str, ...] = SPLITS, passes: int = 1):
    """The surviving documents, split after split (train first), each split in input order,
    with their source as an index into `sources`. Train leading means its packing blocks are
    the same whether prepare packs all splits or streaming mode packs train alone. A repeated
    source's train documents come again in later passes over train (pass k: those with more
    than k copies), as epochs of that source would."""
    kept = docs.filter(expr=col("reason") == "").select_columns(["text", "source", "split", "copies"])
    kept = kept.map_batches(_with_source_index, fn_kwargs={"names": source_names}, batch_format="pyarrow")
    parts = []
    for split in splits:
        rounds = range(passes) if split == "train" else range(1)
        parts += [kept.filter(expr=(col("split") == split) & (col("copies") > k)) for k in rounds]
    parts = [p.drop_columns(["copies"]) for p in parts]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def pack_stream(kept, tokenizer_path: Path, seq_len: int, n_sources: int, actors: bool = True):
    """Lazy windows of every split from kept documents. Blocks of exactly PACK_ROWS documents
    make the windows independent of the cluster's block layout: any cluster packs the same.

    actors=True (prepare): an actor pool, each actor loading the tokenizer once. Half the CPUs
    go to encoders (each also runs Rust threads); the rest keep upstream tasks going (a pool
    that takes every CPU starves its own input on 2 cores). actors=False (inside training,
    which holds most CPUs): plain tasks, which a reserved actor cannot block; the tokenizer is
    then loaded once per worker process."""
    blocks = kept.repartition(target_num_rows_per_block=PACK_ROWS, strict=True)
    packer = {"tokenizer_path": str(tokenizer_path), "width": seq_len + 1, "n_sources": n_sources}
    if not actors:
        return blocks.map_batches(_pack_task, fn_kwargs=packer, batch_size=PACK_ROWS, batch_format="pyarrow")
    return blocks.map_batches(
        EncodeAndPack,
        fn_constructor_kwargs=packer,
        batch_size=PACK_ROWS,
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
    """Pack the kept documents and consume the windows in order on the driver: per-split
    statistics for the manifest, and the splits named in `write` as shards under `out`."""
    kept = kept_documents(docs, source_names, passes=passes)
    windows = pack_stream(kept, tokenizer_path, seq_len, len(source_names))
    return collect_windows(windows, len(source_names), {s: ShardWriter(out / s) for s in write})


def write_train_documents(docs, source_names: list[str], out: Path, passes: int = 1) -> None:
    """Streaming mode keeps the cleaned train documents (repeats included) instead of their windows."""
    train = kept_documents(docs, source_names, splits=("train",), passes=passes)
    train.write_parquet(
        str(out / TRAIN_DOCS),
        filename_provider=ShardNames("docs"),
        mode=SaveMode.OVERWRITE,
        min_rows_per_file=PACK_ROWS * 64,
    )


def stream_train_windows(manifest: Manifest):
    """Streaming mode: the train windows, packed on the fly from the kept documents by Ray Data
    (the same windows prepare would have written), for TorchTrainer's `datasets`."""
    prepared = Path(manifest.path)
    docs = ray.data.read_parquet(str(prepared / TRAIN_DOCS))
    n_sources = len(manifest.sources)
    windows = pack_stream(docs, prepared / manifest.tokenizer, manifest.seq_len, n_sources, actors=False)
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
    The driver already streams every window for the ordered content hash, so it writes them in
    the same pass: three Ray Data write_parquet passes (one per split) took 5.0 s on the 17 MB
    benchmark output, this 0.25 s."""

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


def collect_windows(windows, n_sources: int, writers: dict[str, ShardWriter]) -> dict[str, dict]:
    """Per split: windows, tokens, tail tokens dropped, a content hash of the windows in order,
    target-token counts, and tokens and bytes per source (the achieved mix). Splits with a
    writer are written as they pass."""
    stats = {
        s: {
            "windows": 0,
            "tokens": 0,
            "tail_tokens_dropped": 0,
            "hash": hashlib.sha256(),
            "target_counts": np.zeros(0, np.int64),
            "source_tokens": np.zeros(n_sources, np.int64),
            "source_bytes": np.zeros(n_sources, np.int64),
        }
        for s in SPLITS
    }
    for batch in windows.iter_batches(batch_size=None, batch_format="pyarrow"):
        tokens, labels = as_matrix(batch.column("tokens")), batch.column("split").to_numpy(zero_copy_only=False)
        src_t, src_b = as_matrix(batch.column("source_tokens")), as_matrix(batch.column("source_bytes"))
        for split, st in stats.items():
            full, tail = labels == split, labels == f"{split}:tail"
            if split in writers:
                writers[split].write(tokens[full])
            st["windows"] += int(full.sum())
            st["tokens"] += int(tokens[full].size)
            st["tail_tokens_dropped"] += int((tokens[tail] >= 0).sum())
            st["hash"].update(np.ascontiguousarray(tokens[full]).tobytes())
            counts = np.bincount(tokens[full][:, 1:].ravel(), minlength=len(st["target_counts"]))
            st["target_counts"] = counts + np.pad(st["target_counts"], (0, len(counts) - len(st["target_counts"])))
            st["source_tokens"] += src_t[full | tail].sum(axis=0)
            st["source_bytes"] += src_b[full | tail].sum(axis=0)
    for writer in writers.values():
        writer.close()
    for st in stats.values():
        st["content_hash"] = st.pop("hash").hexdigest()[:16]
    return stats
