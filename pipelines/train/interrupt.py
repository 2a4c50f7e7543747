"""SIGTERM to the driver (`ray job stop`, a Kubernetes pod eviction, `kill`) becomes a clean
stop of the training workers at the next step, with a final checkpoint.

The driver blocks in trainer.fit() while the workers run in other processes, on other nodes:
a signal handler there cannot reach them. A tiny actor carries the request instead. Rank 0
holds a pending call to `wait()`; checking whether it has returned costs one `ray.wait` with
timeout 0 per step, and the loop's per-step all-reduce tells the other ranks.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from contextlib import contextmanager

import ray


@ray.remote(num_cpus=0)
class StopRequest:
    def __init__(self):
        self._event = asyncio.Event()
        self._reason: str | None = None

    async def request(self, reason: str) -> None:
        self._reason = reason
        self._event.set()

    async def wait(self) -> str:
        await self._event.wait()
        return self._reason

    async def reason(self) -> str | None:
        return self._reason


class StopWatch:
    """Worker side: `requested()` is the reason once a stop was asked for, else None."""

    def __init__(self, actor):
        self._pending = actor.wait.remote() if actor is not None else None
        self._reason: str | None = None

    def requested(self) -> str | None:
        if self._reason is None and self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                self._reason = ray.get(ready[0])
        return self._reason


@contextmanager
def stop_on_sigterm(actor):
    """While inside, SIGTERM asks the workers to checkpoint and stop instead of killing the
    driver. A second SIGTERM keeps its default meaning."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (e.g. under Ray Tune)
        return
    wake, signalled = threading.Event(), []

    def handler(signum, frame):
        signalled.append(signum)
        wake.set()
        signal.signal(signal.SIGTERM, previous)

    def forward():  # the actor call happens off the signal handler, outside Ray's own C++ wait
        wake.wait()
        if signalled:
            actor.request.remote("SIGTERM received: stopped with a checkpoint")

    previous = signal.signal(signal.SIGTERM, handler)
    thread = threading.Thread(target=forward, daemon=True, name="raylm-sigterm")
    thread.start()
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)
        wake.set()
        thread.join()


@contextmanager
def stop_when_set(event: threading.Event | None, actor, reason: str):
    """While inside, `event` being set (Ray Tune stopping a trial) asks the workers to
    checkpoint and stop, as a SIGTERM does. Checked every 0.5 s by a helper thread."""
    if event is None:
        yield
        return
    left = threading.Event()

    def forward():
        while not left.is_set():
            if event.wait(timeout=0.5):
                actor.request.remote(reason)
                return

    thread = threading.Thread(target=forward, daemon=True, name="raylm-stop-event")
    thread.start()
    try:
        yield
    finally:
        left.set()
        thread.join()
