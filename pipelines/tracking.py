"""MLflow: one run per raylm command, written through MlflowClient with explicit run ids.

The driver opens the run (config, data report, artifacts, final metrics); rank 0 of the
training workers streams step metrics into the same run through a MetricSink. Explicit ids
instead of mlflow's global "active run" let a worker in another process join the run.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from .errors import Interrupted


class Tracker:
    """Driver side. Use as a context manager: the run ends FINISHED, FAILED or KILLED."""

    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str], run_id: str | None = None):
        """A new run; or, given `run_id`, that run again (a resumed sweep or trial), RUNNING."""
        self.uri = uri
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        self.experiment_id = exp_id

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            status = RunStatus.FINISHED
        elif issubclass(exc_type, (KeyboardInterrupt, Interrupted)):
            status = RunStatus.KILLED
        else:
            status = RunStatus.FAILED
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_params(self, params: dict) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_table(self, rows: list[dict], name: str) -> None:
        """Rows as an MLflow table artifact; list values (options, references) as JSON text."""
        columns = sorted({k for row in rows for k in row})
        data = {c: [json.dumps(r.get(c)) if isinstance(r.get(c), list) else r.get(c) for r in rows] for c in columns}
        self.client.log_table(self.run_id, data=data, artifact_file=name)


class MetricSink:
    """Worker side: buffers step metrics and sends them in batches from a background thread,
    so the training loop never waits on the tracking server (a remote server's round trip, or
    an outage with MLflow's HTTP retries, would otherwise stall every flush). A failed send
    keeps the metrics (up to a cap) for the next try; close() reports what never arrived."""

    MAX_BUFFERED = 100_000
    RETRY_SECONDS = 5.0
    CLOSE_SECONDS = 30.0  # at the end, how long to keep trying to deliver the rest

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = MlflowClient(uri), run_id
        self.buffer: list[Metric] = []
        self.dropped = 0  # oldest metrics discarded past MAX_BUFFERED
        self._lock, self._wake, self._closing = threading.Lock(), threading.Event(), False
        self._warned = False
        self._sender = threading.Thread(target=self._send_loop, daemon=True, name="raylm-mlflow-sink")
        self._sender.start()

    def add(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            self.buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
            overflow = len(self.buffer) - self.MAX_BUFFERED
            if overflow > 0:
                self.dropped += overflow
                del self.buffer[:overflow]

    def flush(self) -> None:
        """Ask the sender to deliver what is buffered; returns at once."""
        self._wake.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._sender.join(timeout=self.CLOSE_SECONDS)
        with self._lock:
            lost = self.dropped + len(self.buffer)
        if lost:
            print(f"[mlflow] {lost} metric values could not be delivered", file=sys.stderr)

    def _send_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._send_some():
                pass
            with self._lock:
                pending = bool(self.buffer)
            if self._closing and not pending:
                return
            if pending:  # the server is unreachable: try again later (or once more at close)
                self._wake.wait(timeout=self.RETRY_SECONDS)
                self._wake.set()

    def _send_some(self) -> bool:
        """Send up to 1000 metrics (log_batch's limit); True if something was sent."""
        with self._lock:
            batch, dropped_before = self.buffer[:1000], self.dropped
        if not batch:
            return False
        try:
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as err:  # noqa: BLE001 - any tracking failure is survivable here
            if not self._warned:
                print(f"[mlflow] could not log metrics ({err.__class__.__name__}); will retry", file=sys.stderr)
                self._warned = True
            return False
        with self._lock:  # add() appends, and trims the front only past MAX_BUFFERED
            del self.buffer[: max(0, len(batch) - (self.dropped - dropped_before))]
        return True
