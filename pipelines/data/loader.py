"""Training batches from packed windows, in a seeded global order with one global position.

The order is a permutation of all windows per epoch, fixed by (seed, epoch). A step consumes
the next batch_size positions of that order whatever the worker count, and rank r of w takes
its share of each micro-step. So the state to checkpoint is one integer, and a resumed run
(even with another worker count) neither repeats nor skips a window.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow.parquet as pq
import torch

from raylm.pipelines.data.arrays import as_matrix

SFT_COLUMNS = ("tokens", "loss_mask", "segments")  # written by sft.py


def read_windows(split_dir: str | Path) -> np.ndarray:
    """All windows of a split, in file order: (N, seq_len + 1) int32 token ids, or for
    fine-tuning data (N, 3, seq_len + 1): tokens, loss mask and example ids stacked."""
    files = sorted(Path(split_dir).glob("*.parquet"))
    return windows_of(pq.ParquetDataset(files).read())


def windows_of(table) -> np.ndarray:
    """A table (or Ray Data batch) of windows as read_windows returns them."""
    if "loss_mask" not in table.column_names:
        return token_matrix(table.column("tokens"))
    return np.stack([token_matrix(table.column(c)) for c in SFT_COLUMNS], axis=1)


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
    def __init__(self, windows: np.ndarray, micro_batch: int, rank: int, world: int, seed: int):
        self.windows, self.micro_batch, self.rank, self.world, self.seed = windows, micro_batch, rank, world, seed
        self.position = 0  # windows consumed by all ranks together
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """This rank's micro-batch: inputs and next-token targets, each (micro_batch, seq_len)
        (and segments, for fine-tuning windows: see as_batch)."""
        start = self.position + self.rank * self.micro_batch
        rows = self.windows[[self._window_at(p) for p in range(start, start + self.micro_batch)]]
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
