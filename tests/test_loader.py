import shutil
import subprocess
import sys

import numpy as np
import pytest

from raylm.pipelines.data import packing
from raylm.pipelines.data.loader import WindowLoader, WindowStore, read_windows
from raylm.pipelines.data.packing import ShardWriter


def windows(n=10, width=5) -> WindowStore:
    """n windows in three uneven shards; row i starts with i*width."""
    return WindowStore(np.array_split(np.arange(n * width, dtype=np.int32).reshape(n, width), 3))


def consumed(world: int, steps: int, batch: int, n=10) -> list[set[int]]:
    """The windows each optimizer step consumed, over all ranks."""
    loaders = [WindowLoader(windows(n), batch // world, r, world, seed=1) for r in range(world)]
    per_step = []
    for _ in range(steps):
        rows = set()
        for loader in loaders:
            x, y = loader.next_batch()
            assert torch_equal_shift(x, y)
            rows |= {int(v) // 5 for v in x[:, 0]}
        per_step.append(rows)
    return per_step


def torch_equal_shift(x, y) -> bool:
    return bool((x[:, 1:] == y[:, :-1]).all())


def test_every_window_exactly_once_per_epoch():
    steps = consumed(world=2, steps=5, batch=2)  # 5 steps x 2 = one epoch of 10 windows
    seen = [w for s in steps for w in s]
    assert sorted(seen) == list(range(10))


def test_step_contents_do_not_depend_on_worker_count():
    assert consumed(world=1, steps=7, batch=4, n=12) == consumed(world=2, steps=7, batch=4, n=12)
    assert consumed(world=4, steps=7, batch=4, n=12) == consumed(world=2, steps=7, batch=4, n=12)


def test_resume_from_state_continues_the_same_order():
    full = WindowLoader(windows(), 3, 0, 1, seed=5)
    ref = [full.next_batch()[0] for _ in range(8)]
    first = WindowLoader(windows(), 3, 0, 1, seed=5)
    _ = [first.next_batch() for _ in range(3)]
    resumed = WindowLoader(windows(), 3, 0, 1, seed=0)
    resumed.load_state_dict(first.state_dict())
    rest = [resumed.next_batch()[0] for _ in range(5)]
    for a, b in zip(ref[3:], rest):
        assert np.array_equal(a.numpy(), b.numpy())


def test_epochs_use_different_orders():
    loader = WindowLoader(windows(n=50), 50, 0, 1, seed=2)
    e0, e1 = loader.next_batch()[0], loader.next_batch()[0]
    assert sorted(e0[:, 0].tolist()) == sorted(e1[:, 0].tolist())
    with pytest.raises(AssertionError):
        assert e0[:, 0].tolist() == e1[:, 0].tolist()


def write_shards(directory, rows: np.ndarray, batch: int) -> None:
    writer = ShardWriter(directory)
    for i in range(0, len(rows), batch):
        writer.write(rows[i : i + batch])
    writer.close()


@pytest.mark.parametrize("row_shape", [(17,), (3, 9)])  # pretraining and fine-tuning windows
def test_store_over_shards_gathers_the_rows_asked_in_order(tmp_path, monkeypatch, row_shape):
    monkeypatch.setattr(packing, "SHARD_BYTES", 3000)  # 44 or 27 rows a shard: many shards
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 2**31 - 1, (500, *row_shape), dtype=np.int32)
    write_shards(tmp_path / "train", rows, batch=7)
    store = WindowStore.open(tmp_path / "train")
    assert len(store.shards) > 10 and len(store) == 500
    assert np.array_equal(read_windows(tmp_path / "train"), rows)
    for size in (1, 8, 64, 1000):  # unsorted, across shards, with repeats
        index = rng.integers(0, 500, size)
        assert np.array_equal(store.rows(index), rows[index])
    covered = store.ranges(123, rows=10)
    assert all(r["stop"] - r["start"] <= 10 for r in covered)
    assert sum(r["stop"] - r["start"] for r in covered) == 123
    # Every shard gives its first rows, about 123/500 of its own.
    taken = {p: sum(r["stop"] - r["start"] for r in covered if r["path"] == p) for p in store.paths}
    assert all(abs(taken[p] - 0.246 * len(s)) <= 1 for p, s in zip(store.paths, store.shards))
    picked = [np.load(r["path"])[r["start"] : r["stop"]] for r in covered]
    assert np.concatenate(picked).tolist() == store.rows(sample_index(store, taken)).tolist()
    whole = store.ranges(None, rows=10)
    assert np.concatenate([np.load(r["path"])[r["start"] : r["stop"]] for r in whole]).tolist() == rows.tolist()


def sample_index(store: WindowStore, taken: dict[str, int]) -> np.ndarray:
    return np.concatenate([np.arange(first, first + taken[p]) for p, first in zip(store.paths, store.starts)])


# VmHWM, the child's own high-water mark: ru_maxrss survives exec, so a child of this pytest
# process (torch and Ray loaded) would start at the parent's RSS whatever it reads.
RANK_RSS = """
import sys
from raylm.pipelines.data.loader import WindowLoader, WindowStore
peak = lambda: next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
imported = peak()
loader = WindowLoader(WindowStore.open(sys.argv[1]), 8, 0, 2, seed=0)
for _ in range(20):
    loader.next_batch()
print(imported, peak())  # KiB
"""


def rank_rss_kib(directory) -> tuple[int, int]:
    """A training rank's peak RSS after importing the loader, and after 20 micro-batches."""
    out = subprocess.run([sys.executable, "-c", RANK_RSS, str(directory)], capture_output=True, text=True, check=True)
    imported, peak = map(int, out.stdout.split())
    return imported, peak


def test_rank_memory_does_not_grow_with_the_corpus(tmp_path):
    """The issue's "rank RSS at 10x the data", at test scale: 40 MB and 400 MB of windows of
    1,025 tokens. The rank's peak RSS (the loader's imports, ~250 MB of it torch) may grow by
    its micro-batches and the permutation (8 bytes per window: 0.8 MB at 400 MB), not by the
    data: measured +8 MB at both sizes (+153 MB at 400 MB when rows were read through the map)."""
    chunk = (np.arange(1000 * 1025, dtype=np.int32) % 50_000).reshape(1000, 1025)  # 4.1 MB
    peaks = {}
    for mb in (40, 400):
        directory = tmp_path / f"{mb}mb" / "train"
        try:
            writer = ShardWriter(directory)
            for _ in range(mb * 2**20 // chunk.nbytes):
                writer.write(chunk)
            writer.close()
            imported, peaks[mb] = rank_rss_kib(directory)
            print(
                f"{mb} MB of windows: rank peak RSS {imported / 1024:.0f} MB imported, {peaks[mb] / 1024:.0f} MB after"
            )
            assert peaks[mb] - imported < 50 * 1024  # KiB, against 400 MB of data
        finally:
            shutil.rmtree(directory.parent)
    assert peaks[400] <= 1.2 * peaks[40]
