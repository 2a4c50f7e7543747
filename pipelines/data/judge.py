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
(ray/data/grouped_data.py), and `batch_size=None` hands that block over whole. Cost per kept
document, in bytes moved: 16 (exact), 24 per band (buckets), 2 x 520 per linked candidate pair
plus 2 x 520 (signatures, to check pairs), 16 per linked document per round (clusters).

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
from raylm.pipelines.data.arrays import as_matrix

EXACT, NEAR = "exact_duplicate", "near_duplicate"
NO_LABEL = np.iinfo(np.int64).max  # a message row's "old label": larger than any position
PAIR_SCHEMA = pa.schema([("first", pa.int64()), ("pos", pa.int64())])
DROP_SCHEMA = pa.schema([("pos", pa.int64()), ("reason", pa.string())])


def duplicates(kept, dedup: DedupSection):
    """(pos, reason) of every kept document that goes as a duplicate, sorted by pos and
    materialized. `kept` has pos, exact_key, band_keys and signature columns."""
    parts = []
    if dedup.exact:
        exact = _sorted(kept.select_columns(["pos", "exact_key"]), "exact_key")
        parts.append(exact.map_batches(_later_members, fn_kwargs={"keys": ["exact_key"], "reason": EXACT}, **WHOLE))
    if dedup.near:
        labels = clusters(linked_pairs(kept, dedup.threshold))
        parts.append(labels.map_batches(_not_first_of_cluster, **WHOLE))
    if not parts:
        return None
    return _sorted(parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0], "pos").materialize()


WHOLE = {"batch_size": None, "batch_format": "pyarrow"}  # one call per block: the sort's groups stay whole
BLOCK_BYTES = 128 * 2**20  # Ray Data's default target block size


def _sorted(ds, key):
    """`ds` sorted by `key`, in blocks of about BLOCK_BYTES. A sort makes as many blocks as it
    is given and runs (blocks)^2 shuffle pieces, and unions add blocks up: unchecked, 8 input
    blocks became 24 by the third sort and a 1,500-document test took 57 s."""
    ds = ds.materialize()
    return ds.repartition(max(1, math.ceil(ds.size_bytes() / BLOCK_BYTES))).sort(key)


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
    signatures agree on >= threshold of the permutations."""
    buckets = kept.select_columns(["pos", "band_keys"]).map_batches(_bucket_rows, batch_format="pyarrow")
    pairs = _sorted(buckets, ["band", "key"]).map_batches(_later_members, fn_kwargs={"keys": ["band", "key"]}, **WHOLE)
    signatures = kept.select_columns(["pos", "signature"])
    with_first = _meet(pairs, "first", signatures)  # each pair gets its first's signature
    return _meet(with_first, "pos", signatures, threshold)


def _bucket_rows(batch: pa.Table) -> pa.Table:
    """One row per (document, band): band index, band key, pos."""
    keys = as_matrix(batch.column("band_keys")).astype(np.int64, copy=False)
    n, bands = keys.shape
    return pa.table(
        {
            "band": np.tile(np.arange(bands, dtype=np.int32), n),
            "key": keys.ravel(),
            "pos": np.repeat(batch.column("pos").to_numpy(), bands),
        }
    )


def _meet(pairs, on: str, signatures, threshold: float | None = None):
    """Sort-merge join of pair rows with the signature of their `on` end. Both become rows
    (key, first, pos, signature, is_pair) in one dataset, sorted by key; a block pass copies
    the signature onto its pairs. The first pass carries the first's signature along; the
    second (given a threshold) compares it with the other end's and keeps the agreeing pairs."""
    pair_rows = pairs.map_batches(_pair_rows, fn_kwargs={"on": on}, batch_format="pyarrow")
    signature_rows = signatures.map_batches(_signature_rows, batch_format="pyarrow")
    both = _sorted(pair_rows.union(signature_rows), "key")
    return both.map_batches(_signatures_onto_pairs, fn_kwargs={"threshold": threshold}, **WHOLE)


def _pair_rows(batch: pa.Table, on: str) -> pa.Table:
    n = batch.num_rows
    signature = batch.column("signature") if "signature" in batch.column_names else None
    return pa.table(
        {
            "key": batch.column(on),
            "first": batch.column("first"),
            "pos": batch.column("pos"),
            "signature": signature if signature is not None else pa.nulls(n, pa.list_(pa.uint32())),
            "is_pair": pa.array(np.ones(n, bool)),
        }
    )


def _signature_rows(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    return pa.table(
        {
            "key": batch.column("pos"),
            "first": pa.array(np.full(n, -1, np.int64)),
            "pos": batch.column("pos"),
            "signature": _as_lists(as_matrix(batch.column("signature")).astype(np.uint32, copy=False)),
            "is_pair": pa.array(np.zeros(n, bool)),
        }
    )


def _as_lists(matrix: np.ndarray) -> pa.ListArray:
    """Rows as list<uint32>: pair rows carry a null in the same column, which a fixed-size
    list in Ray's tensor extension would not take."""
    n, width = matrix.shape if matrix.ndim == 2 else (0, 0)
    offsets = np.arange(0, n * width + 1, max(width, 1), dtype=np.int32)[: n + 1]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.ravel(), pa.uint32()))


def _signatures_onto_pairs(block: pa.Table, threshold: float | None) -> pa.Table:
    is_pair = block.column("is_pair").to_numpy(zero_copy_only=False)
    key = block.column("key").to_numpy()
    owners = np.flatnonzero(~is_pair)
    owner_keys, owner_order = key[owners], np.argsort(key[owners])
    pairs = np.flatnonzero(is_pair)
    found = owners[owner_order[np.searchsorted(owner_keys[owner_order], key[pairs])]]
    signatures = block.column("signature")
    mine = _matrix(signatures.take(pa.array(found)))
    out = pa.table({"first": block.column("first").take(pairs), "pos": block.column("pos").take(pairs)})
    if threshold is None:
        return out.append_column("signature", _as_lists(mine))
    if not len(pairs):
        return out  # a block of signatures only: nothing to check (and no mean of nothing)
    carried = _matrix(signatures.take(pa.array(pairs)))
    agree = (carried == mine).mean(axis=1) >= threshold
    return out.filter(pa.array(agree))


def _matrix(column) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(column) == 0:
        return np.zeros((0, 0), np.uint32)
    return column.flatten().to_numpy().reshape(len(column), -1)


# -- near duplicates: connected clusters of linked documents ------------------------------------


def clusters(links):
    """(pos, label) for every linked document: label = the least pos of its cluster. Min-label
    propagation: each round, every document takes the least label among itself and its
    neighbours; it stops in the round where no label changes (rounds = the clusters' widest
    distance + 1; links run from a bucket's first to its members, so clusters are shallow)."""
    edges = links.map_batches(_both_directions, batch_format="pyarrow").materialize()
    least = _sorted(edges, "node").map_batches(_least_per_node, fn_kwargs={"columns": ["neighbour"]}, **WHOLE)
    labels = least.map_batches(_own_label_if_least, batch_format="pyarrow").materialize()
    while True:
        messages = _sorted(edges.union(labels.map_batches(_label_rows, batch_format="pyarrow")), "node")
        proposals = messages.map_batches(_send_labels, **WHOLE)
        merged = (
            _sorted(proposals, "node")
            .map_batches(_least_per_node, fn_kwargs={"columns": ["label", "old"]}, **WHOLE)
            .materialize()
        )
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


# -- looking verdicts up, block by block ---------------------------------------------------------


@dataclass
class DropIndex:
    """The dropped positions as sorted blocks in the object store, with each block's first and
    last pos: a batch of documents fetches only the blocks its positions fall in (a merge join
    in input order; the corpus text never moves). The driver holds 2 numbers per block."""

    lows: np.ndarray
    highs: np.ndarray
    blocks: list  # ObjectRef[pa.Table] of (pos, reason), in pos order

    @classmethod
    def of(cls, dropped) -> DropIndex:
        if dropped is None:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), [])
        blocks = dropped.to_arrow_refs()
        bounds = np.array(ray.get([_bounds.remote(b) for b in blocks]), np.int64).reshape(-1, 2)
        has_rows = bounds[:, 0] <= bounds[:, 1]
        return cls(bounds[has_rows, 0], bounds[has_rows, 1], [b for b, keep in zip(blocks, has_rows) if keep])

    def reasons(self, pos: np.ndarray) -> np.ndarray:
        """The drop reason of each position ("" where it stays); exact_duplicate wins."""
        out = np.full(len(pos), "", dtype=object)
        if not len(pos) or not self.blocks:
            return out
        lo, hi = pos.min(), pos.max()
        wanted = np.flatnonzero((self.highs >= lo) & (self.lows <= hi))
        if not len(wanted):
            return out
        table = pa.concat_tables(ray.get([self.blocks[i] for i in wanted]))
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
