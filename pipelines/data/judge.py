"""Stage 2 of `raylm prepare`: which kept documents go as duplicates, decided by Ray Data sorts
spread over the workers. The driver holds a few numbers per block and per source, never one
per document (a per-document index of ~2.4 KB filled a 16 GiB head at about 6M documents).

The rule, the same on any cluster: documents are ordered by `pos`, their place in the input
(file number, then line). Of documents with the same exact key the first stays. Near
duplicates (MinHash/LSH, see dedup.py): in each LSH bucket (band, key), every member is linked
to the bucket's first member if their signatures agree on >= threshold of the permutations; of
each connected cluster of links the first stays.

Every step is a sort on a key followed by a whole-block pass: a sort puts all rows that share
the key in one output block, which Ray Data's own `groupby().map_groups` relies on as well
(ray/data/grouped_data.py), and `batch_size=None` hands that block over whole. Each step's output
is materialized, so its input is released. Cost per kept document, in bytes sorted: 16 (exact),
16 per band (buckets), per candidate pair 16 (sorted by its first) and 16 + 512 (sorted by its
other end, with the first's signature), 24 per linked document per round (clusters).
Signatures are never sorted: they stay in input order, in blocks cut from the kept documents,
and a pass over pairs sorted by one end fetches the few blocks its positions fall in
(PosBlocks, a range join). At 5M documents the earlier sort-merge join of all signatures with
the pairs, twice, spilled more than 32 GB and stopped on a full disk.

An exact duplicate never changes the near-duplicate clusters of the others: its words, hence
its signature and buckets, equal those of its earlier twin, which sits in every bucket with it,
so it is never a bucket's first and links only where its twin does. So both searches run on all
kept documents, independently, and exact_duplicate wins where both name a document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from raylm.config import DedupSection
from raylm.pipelines.data.arrays import as_fixed_list, as_matrix

EXACT, NEAR = "exact_duplicate", "near_duplicate"
NO_LABEL = np.iinfo(np.int64).max  # a message row's "old label": larger than any position
PAIR_SCHEMA = pa.schema([("first", pa.int64()), ("pos", pa.int64())])
DROP_SCHEMA = pa.schema([("pos", pa.int64()), ("reason", pa.string())])


def duplicates(kept, dedup: DedupSection):
    """(pos, reason) of every kept document that goes as a duplicate, sorted by pos and
    materialized. `kept` has pos, exact_key, band_keys and signature columns."""
    parts = []
    if dedup.exact:
        exact = kept.select_columns(["pos", "exact_key"])
        parts.append(_by_key(exact, "exact_key", _later_members, hashed=True, keys=["exact_key"], reason=EXACT))
    if dedup.near:
        labels = clusters(linked_pairs(kept, dedup.threshold))
        parts.append(labels.map_batches(_not_first_of_cluster, **WHOLE))
    if not parts:
        return None
    return _sorted(parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0], "pos").materialize()


WHOLE = {"batch_size": None, "batch_format": "pyarrow"}  # one call per block: the sort's groups stay whole
BLOCK_BYTES = 128 * 2**20  # Ray Data's default target block size


def _sorted(ds, key, row_bytes: float = 0, hashed: bool = False):
    """`ds` sorted by `key`, in blocks of about BLOCK_BYTES (or of rows grown to `row_bytes`
    by the pass that follows). A sort makes as many blocks as it is given and runs (blocks)^2
    shuffle pieces, and unions add blocks up: unchecked, 8 input blocks became 24 by the third
    sort and a 1,500-document test took 57 s.

    A `hashed` key is spread evenly over int64, so even cuts of that range give blocks of one
    size. Ray cuts where 10 sampled rows per output block fall (SORT_SAMPLE_POINTS_PER_PARTITION
    in ray/data/_internal/planner/exchange/sort_task_spec.py): a block's share then varies by
    about 1/sqrt(10), and the largest of 20 bucket blocks at 5M documents made the largest
    worker 1.30x that of 2 blocks at 0.5M."""
    ds = ds.materialize()
    blocks = max(1, math.ceil(max(ds.size_bytes(), ds.count() * row_bytes) / BLOCK_BYTES))
    ds = ds.repartition(blocks)
    return ds.sort(key, boundaries=even_cuts(blocks)) if hashed and blocks > 1 else ds.sort(key)


def even_cuts(blocks: int) -> list[int]:
    """blocks - 1 values that cut the int64 range into `blocks` equal parts."""
    return [-(2**63) + (i * 2**64) // blocks for i in range(1, blocks)]


def _later_members(block: pa.Table, keys: list[str], reason: str | None = None) -> pa.Table:
    """Rows sharing `keys`: every member but the one with the least pos, with that least pos
    as `first` (or, given a reason, as (pos, reason) rows)."""
    pos = block.column("pos").to_numpy()
    columns = [block.column(k).to_numpy() for k in reversed(keys)]
    order = np.lexsort([pos, *columns])  # by keys, then pos: each group's first leads
    same = np.ones(len(order), bool)
    for column in columns:
        ordered = column[order]
        same[1:] &= ordered[1:] == ordered[:-1]
    same[:1] = False
    starts = np.maximum.accumulate(np.where(same, 0, np.arange(len(order))))
    later, first = pos[order][same], pos[order][starts][same]
    if reason:
        return pa.table({"pos": later, "reason": pa.array([reason] * len(later), pa.string())}, schema=DROP_SCHEMA)
    return pa.table({"first": first, "pos": later}, schema=PAIR_SCHEMA)


# -- near duplicates: candidate pairs, checked against their signatures --------------------------


def linked_pairs(kept, threshold: float):
    """(first, pos): each bucket's later members paired with its first, kept where their
    signatures agree on >= threshold of the permutations. Signatures are never sorted: each
    pass over pairs sorted by one end fetches the few signature blocks whose positions its
    block covers (a range join, as DropIndex does)."""
    buckets = kept.select_columns(["pos", "band_keys"]).map_batches(_bucket_rows, batch_format="pyarrow")
    pairs = _by_key(buckets, "key", _later_members, hashed=True, keys=["key"])
    rows = kept.select_columns(["pos", "signature"]).materialize()
    signatures, signature_bytes = PosBlocks.of(rows), rows.size_bytes() / max(1, rows.count())
    # Cut by the size the pairs grow to: in one 128 MB block of bare pairs (8M), the pass would
    # fetch every signature and write 4 GB.
    grown = 16 + signature_bytes  # (first, pos) and a signature
    with_first = _by_key(pairs, "first", _with_signature_of_first, row_bytes=grown, signatures=signatures)
    return _by_key(with_first, "pos", _agreeing, signatures=signatures, threshold=threshold)


def _by_key(ds, key, block_pass, row_bytes: float = 0, hashed: bool = False, **kwargs):
    """`block_pass` over `ds` sorted by `key`, materialized: the sort's input and output are
    released once the caller lets go of `ds` (a lazy result would keep every earlier step's
    blocks alive; at 5M documents they spilled more than 32 GB)."""
    ordered = _sorted(ds, key, row_bytes, hashed)
    return ordered.map_batches(block_pass, fn_kwargs=kwargs, **WHOLE).materialize()


def _bucket_rows(batch: pa.Table) -> pa.Table:
    """One row per (document, band): band key, pos. dedup.band_keys seeds each band's key with
    the band's index, so keys of different bands differ and the band need not travel (16 bytes
    a row, not 20; a chance collision of 64-bit keys only adds a candidate for the signatures
    to check)."""
    keys = as_matrix(batch.column("band_keys")).astype(np.int64, copy=False)
    return pa.table({"key": keys.ravel(), "pos": np.repeat(batch.column("pos").to_numpy(), keys.shape[1])})


def _with_signature_of_first(block: pa.Table, signatures: PosBlocks) -> pa.Table:
    first = block.column("first").to_numpy()
    return block.append_column("signature", as_fixed_list(signatures.of_positions(first)))


def _agreeing(block: pa.Table, signatures: PosBlocks, threshold: float) -> pa.Table:
    if not block.num_rows:
        return block.select(["first", "pos"])
    carried = as_matrix(block.column("signature"))
    mine = signatures.of_positions(block.column("pos").to_numpy())
    agree = (carried == mine).mean(axis=1) >= threshold
    return block.select(["first", "pos"]).filter(pa.array(agree))


# -- near duplicates: connected clusters of linked documents ------------------------------------


def clusters(links):
    """(pos, label) for every linked document: label = the least pos of its cluster. Min-label
    propagation: each round, every document takes the least label among itself and its
    neighbours; it stops in the round where no label changes (rounds = the clusters' widest
    distance + 1; links run from a bucket's first to its members, so clusters are shallow)."""
    edges = links.map_batches(_both_directions, batch_format="pyarrow").materialize()
    least = _by_key(edges, "node", _least_per_node, columns=["neighbour"])
    labels = least.map_batches(_own_label_if_least, batch_format="pyarrow").materialize()
    while True:
        messages = edges.union(labels.map_batches(_label_rows, batch_format="pyarrow"))
        proposals = _by_key(messages, "node", _send_labels)
        merged = _by_key(proposals, "node", _least_per_node, columns=["label", "old"])
        if merged.map_batches(_changed, batch_format="pyarrow").sum("changed") in (None, 0):
            return merged.select_columns(["node", "label"]).rename_columns({"node": "pos"})
        labels = merged.select_columns(["node", "label"]).materialize()


def _both_directions(batch: pa.Table) -> pa.Table:
    """Edges (node, neighbour, label) both ways; label is NO_LABEL on edge rows."""
    a, b = batch.column("first").to_numpy(), batch.column("pos").to_numpy()
    return pa.table(
        {
            "node": np.concatenate([a, b]),
            "neighbour": np.concatenate([b, a]),
            "label": np.full(2 * len(a), NO_LABEL, np.int64),
        }
    )


def _least_per_node(block: pa.Table, columns: list[str]) -> pa.Table:
    """Per node (all its rows are in this block), the least value of each of `columns`."""
    node = block.column("node").to_numpy()
    order = np.argsort(node, kind="stable")
    starts = np.flatnonzero(np.r_[True, node[order][1:] != node[order][:-1]]) if len(node) else np.zeros(0, int)
    least = {c: np.minimum.reduceat(block.column(c).to_numpy()[order], starts) if len(node) else [] for c in columns}
    return pa.table({"node": node[order][starts], **{c: pa.array(v, pa.int64()) for c, v in least.items()}})


def _own_label_if_least(batch: pa.Table) -> pa.Table:
    node = batch.column("node").to_numpy()
    return pa.table({"node": node, "label": np.minimum(node, batch.column("neighbour").to_numpy())})


def _label_rows(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    return pa.table(
        {"node": batch.column("node"), "neighbour": pa.array(np.full(n, -1, np.int64)), "label": batch.column("label")}
    )


def _send_labels(block: pa.Table) -> pa.Table:
    """Per node (all its rows are in this block): its label goes to each neighbour, and stays
    with the node as its old label."""
    node, neighbour = block.column("node").to_numpy(), block.column("neighbour").to_numpy()
    label = block.column("label").to_numpy()
    own = neighbour < 0
    owner_nodes, owner_labels = node[own], label[own]
    order = np.argsort(owner_nodes)
    edge = ~own
    sent = owner_labels[order[np.searchsorted(owner_nodes[order], node[edge])]]
    return pa.table(
        {
            "node": np.concatenate([owner_nodes, neighbour[edge]]),
            "label": np.concatenate([owner_labels, sent]),
            "old": np.concatenate([owner_labels, np.full(len(sent), NO_LABEL, np.int64)]),
        }
    )


def _changed(batch: pa.Table) -> pa.Table:
    return pa.table({"changed": pc.less(batch.column("label"), batch.column("old")).cast(pa.int64())})


def _not_first_of_cluster(block: pa.Table) -> pa.Table:
    pos, label = block.column("pos").to_numpy(), block.column("label").to_numpy()
    later = pos[pos != label]
    return pa.table({"pos": later, "reason": pa.array([NEAR] * len(later), pa.string())}, schema=DROP_SCHEMA)


# -- looking rows up by position, block by block ---------------------------------------------------


@dataclass
class PosBlocks:
    """A materialized dataset with a `pos` column, as its blocks in the object store and each
    block's least and greatest pos: a batch fetches only the blocks its positions fall in (a
    range join; with blocks cut from the input in order, a few). The driver holds 2 numbers
    per block."""

    lows: np.ndarray
    highs: np.ndarray
    blocks: list  # ObjectRef[pa.Table]

    @classmethod
    def of(cls, ds) -> PosBlocks:
        blocks = ds.to_arrow_refs()
        bounds = np.array(ray.get([_bounds.remote(b) for b in blocks]), np.int64).reshape(-1, 2)
        has_rows = bounds[:, 0] <= bounds[:, 1]
        return cls(bounds[has_rows, 0], bounds[has_rows, 1], [b for b, keep in zip(blocks, has_rows) if keep])

    def covering(self, pos: np.ndarray) -> pa.Table | None:
        """The rows of every block whose range meets [min(pos), max(pos)], sorted by pos."""
        if not len(pos) or not self.blocks:
            return None
        wanted = np.flatnonzero((self.highs >= pos.min()) & (self.lows <= pos.max()))
        if not len(wanted):
            return None
        return pa.concat_tables(ray.get([self.blocks[i] for i in wanted])).sort_by("pos")

    def of_positions(self, pos: np.ndarray, column: str = "signature") -> np.ndarray:
        """`column` (a fixed-size list) of the row at each position: every position is there."""
        table = self.covering(pos)
        at = np.searchsorted(table.column("pos").to_numpy(), pos)
        return as_matrix(table.column(column))[at]


@dataclass
class DropIndex:
    """The dropped positions, (pos, reason) sorted by pos, looked up block by block: a merge
    join in input order; the corpus text never moves."""

    rows: PosBlocks | None

    @classmethod
    def of(cls, dropped) -> DropIndex:
        return cls(PosBlocks.of(dropped) if dropped is not None else None)

    def reasons(self, pos: np.ndarray) -> np.ndarray:
        """The drop reason of each position ("" where it stays); exact_duplicate wins."""
        out = np.full(len(pos), "", dtype=object)
        table = self.rows.covering(pos) if self.rows else None
        if table is None:
            return out
        dropped, reason = table.column("pos").to_numpy(), table.column("reason").to_numpy(zero_copy_only=False)
        order = np.lexsort([reason != EXACT, dropped])  # by pos; exact_duplicate before near_duplicate
        dropped, reason = dropped[order], reason[order]
        at = np.searchsorted(dropped, pos)
        hit = at < len(dropped)
        hit[hit] = dropped[at[hit]] == pos[hit]
        out[hit] = reason[at[hit]]
        return out


@ray.remote(num_cpus=0.1)
def _bounds(block: pa.Table) -> tuple[int, int]:
    if block.num_rows == 0:
        return 1, 0  # empty: low > high
    pos = block.column("pos")
    return pc.min(pos).as_py(), pc.max(pos).as_py()


def position(file_number: np.ndarray, line: np.ndarray) -> np.ndarray:
    """A document's place in the input as one sortable int64: file number (sources in config
    order, each source's files sorted), then line (or Parquet row). 2^40 lines per file."""
    return (file_number.astype(np.int64) << 40) | line.astype(np.int64)
