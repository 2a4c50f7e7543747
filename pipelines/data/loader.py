"""Training batches from packed windows, in a seeded global order with one global position.

The order is a permutation of all windows per epoch, fixed by (seed, epoch). A step consumes
the next batch_size positions of that order whatever the worker count, and rank r of w takes
its share of each micro-step. So the state to checkpoint is one integer, and a resumed run
(even with another worker count) neither repeats nor skips a window.

The windows stay on disk: a split is a directory of .npy shards (packing.ShardWriter), which
WindowStore knows by their headers and reads row by row, so a rank reads only the rows of its
micro-batches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from raylm.errors import DataError
from raylm.pipelines.data.arrays import as_fixed_list, as_matrix

SFT_COLUMNS = ("tokens", "loss_mask", "segments")  # the planes of a fine-tuning window (sft.py)


class WindowStore:
    """A split's windows across its shards, in file order, as one indexable sequence of rows:
    (seq_len + 1,) int32 token ids, or for fine-tuning data (3, seq_len + 1): tokens, loss mask
    and example ids. Shards opened from disk are known by their .npy headers and read with
    pread, so holding a store costs nothing; rows() copies the asked rows out."""

    def __init__(self, shards: Sequence[np.ndarray], paths: Sequence[str] = ()):
        self.shards, self.paths = list(shards), [str(p) for p in paths]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # global index of each shard's first row
        self.row_shape = self.shards[0].shape[1:] if self.shards else (0,)

    @classmethod
    def open(cls, split_dir: str | Path) -> WindowStore:
        """Every .npy shard of a split directory, in name order, by its header alone: nothing is
        mapped or held open, so a split of 10,000 shards costs 10,000 small objects, not 10,000
        file descriptors (a memory map keeps its file open)."""
        files = sorted(Path(split_dir).glob("*.npy"))
        if not files:
            raise DataError(f"{split_dir}: no .npy window shards; prepare the data again with this raylm")
        shards = [ShardFile(f) for f in files]
        for shard in shards:
            if shard.dtype != np.int32 or shard.shape[1:] != shards[0].shape[1:]:
                raise DataError(
                    f"{shard.path}: {shard.dtype} rows of shape {shard.shape[1:]}, want int32 {shards[0].shape[1:]}"
                )
        return cls(shards, files)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, indices) -> np.ndarray:
        """The rows at these global indices, in the order asked: (len(indices), *row_shape)
        int32. Each shard is read in ascending row order, so the disk sees sorted reads."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), *self.row_shape), np.int32)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for s in np.unique(shard_of):
            picked = np.flatnonzero(shard_of == s)
            local = indices[picked] - self.starts[s]
            ascending = np.argsort(local, kind="stable")
            out[picked[ascending]] = self._read(int(s), local[ascending])
        return out

    def _read(self, shard: int, local: np.ndarray) -> np.ndarray:
        """Rows of one shard. A shard on disk is read with pread, not through a memory map: a page
        fault maps the whole page-cache folio around the row (up to 2 MB), so 160 scattered
        windows of a 400 MB split added 135 MB of file pages to the rank's RSS, and more with
        every step; pread copies just the row."""
        array = self.shards[shard]
        return array.read(local) if isinstance(array, ShardFile) else array[local]

    def head(self, n: int | None = None) -> np.ndarray:
        """The first n rows (all if None) in file order, in memory."""
        return self.rows(np.arange(len(self) if n is None else min(n, len(self))))

    def ranges(self, n: int | None, rows: int) -> list[dict]:
        """n rows (all if None) as {"path", "start", "stop"} ranges of at most `rows` rows within
        one shard: work items for tasks that read by mmap. Each shard gives its first rows, in
        proportion to its size, so a sample of the split covers every shard (shards follow the
        corpus's order, so its first n rows could all be one source's)."""
        total = len(self)
        n = total if n is None else min(n, total)
        cuts = [n * int(end) // max(total, 1) for end in self.starts]  # rows taken before each shard's end
        out = []
        for path, take in zip(self.paths, np.diff(cuts)):
            for start in range(0, int(take), rows):
                out.append({"path": path, "start": start, "stop": int(min(start + rows, take))})
        return out


class ShardFile:
    """A .npy shard known by its header (shape, dtype, where the rows start); rows are read on
    demand with pread."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            self.shape, fortran_order, self.dtype = read_header(f)
            self.offset = f.tell()
        if fortran_order:
            raise DataError(f"{self.path}: a Fortran-ordered array, not rows of windows")

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, local: np.ndarray) -> np.ndarray:
        """The rows at these indices, in the order given (ascending reads suit the disk)."""
        row_shape = self.shape[1:]
        width = int(np.prod(row_shape)) * self.dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)  # per call: a split may have thousands of shards
        try:
            data = b"".join(os.pread(fd, width, self.offset + int(i) * width) for i in local)
        finally:
            os.close(fd)
        return np.frombuffer(data, self.dtype).reshape(len(local), *row_shape)


def read_range(path: str, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of one shard, read through a memory map."""
    return np.array(np.load(path, mmap_mode="r")[start:stop])


def read_windows(split_dir: str | Path) -> np.ndarray:
    """All windows of a split in memory, in file order: for small splits and tests; training
    reads through a WindowStore instead."""
    return WindowStore.open(split_dir).head()


def windows_of(table) -> np.ndarray:
    """A table (or Ray Data batch) of windows -> (N, seq_len + 1), or (N, 3, seq_len + 1) for
    fine-tuning windows; the inverse of table_of."""
    if "loss_mask" not in table.column_names:
        return token_matrix(table.column("tokens"))
    return np.stack([token_matrix(table.column(c)) for c in SFT_COLUMNS], axis=1)


def table_of(windows: np.ndarray) -> pa.Table:
    """Windows as an Arrow table: a `tokens` column, and for fine-tuning windows (N, 3, W) also
    `loss_mask` and `segments`."""
    if windows.ndim == 2:
        return pa.table({"tokens": as_fixed_list(windows)})
    return pa.table({c: as_fixed_list(windows[:, i]) for i, c in enumerate(SFT_COLUMNS)})


def as_batch(rows: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Windows -> model inputs and next-token targets, each (B, seq_len); fine-tuning windows
    also give segments (B, seq_len), and targets of -100 where the loss does not count: prompt
    tokens, padding, and an example's first token (nothing in its own example predicts it)."""
    batch = torch.as_tensor(rows).long()  # stays on the tensor's device
    if batch.dim() == 2:
        return batch[:, :-1], batch[:, 1:]
    tokens, mask, segments = batch.unbind(1)
    counted = mask[:, 1:].bool() & (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
    return tokens[:, :-1], torch.where(counted, tokens[:, 1:], -100), segments[:, :-1]


def token_matrix(column) -> np.ndarray:
    """A `tokens` column as an (N, seq_len + 1) int32 array."""
    return as_matrix(column).astype(np.int32, copy=False)


class BatchSource(Protocol):
    """What the training loop needs of a loader (WindowLoader, StreamLoader): this rank's
    micro-batches in order, and a position to checkpoint and resume from."""

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """This rank's next micro-batch: inputs and targets, each (micro_batch, seq_len), and
        for fine-tuning windows their segments too (see as_batch)."""
        ...

    def state_dict(self) -> dict:
        """The data position, global over ranks, for the checkpoint."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() of an earlier run."""
        ...


class WindowLoader:
    """Batches from a WindowStore in the seeded global order. Per epoch the order is one int64
    permutation of the split, 8 bytes a window (5M windows of 1,025 tokens, 20 GB of data: 40 MB),
    so a rank holds that plus its micro-batch, whatever the corpus' size."""

    def __init__(self, windows: WindowStore, micro_batch: int, rank: int, world: int, seed: int):
        self.windows, self.micro_batch, self.rank, self.world, self.seed = windows, micro_batch, rank, world, seed
        self.position = 0  # windows consumed by all ranks together
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """This rank's micro-batch: inputs and next-token targets, each (micro_batch, seq_len)
        (and segments, for fine-tuning windows: see as_batch)."""
        start = self.position + self.rank * self.micro_batch
        rows = self.windows.rows([self._window_at(p) for p in range(start, start + self.micro_batch)])
        self.position += self.micro_batch * self.world
        return as_batch(rows)

    def _window_at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.windows))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
        return int(self._order[offset])

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.seed = int(state["position"]), int(state["seed"])


class StreamLoader:
    """The same interface over a Ray Data stream (streaming mode): this rank's shard of the
    packed windows, in stream order, epoch after epoch. The position counts windows consumed
    by all ranks; resuming re-streams and skips them, which is exact only with the same
    worker count (each rank's shard depends on it)."""

    def __init__(self, shard, micro_batch: int, world: int):
        self.shard, self.micro_batch, self.world = shard, micro_batch, world
        self.position = 0
        self._batches = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._next_rows()
        self.position += self.micro_batch * self.world
        return as_batch(rows)

    def _next_rows(self) -> np.ndarray:
        for fresh in (False, True):
            if self._batches is None or fresh:
                self._batches = iter(
                    self.shard.iter_batches(batch_size=self.micro_batch, batch_format="pyarrow", drop_last=True)
                )
            rows = next(self._batches, None)
            if rows is not None:
                return token_matrix(rows.column("tokens"))
        raise ValueError(f"the training stream holds fewer than micro_batch_size={self.micro_batch} windows per worker")

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        for _ in range(int(state["position"]) // (self.micro_batch * self.world)):
            self.next_batch()
