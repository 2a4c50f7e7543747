import numpy as np
import pytest

from raylm.pipelines.data.loader import WindowLoader


def windows(n=10, width=5):
    return np.arange(n * width, dtype=np.int32).reshape(n, width)  # row i starts with i*width


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
