"""MLflow: one run per raylm command, written through MlflowClient with explicit run ids.

The driver opens the run (config, data report, artifacts, final metrics); rank 0 of the
training workers streams step metrics into the same run through a MetricSink. Explicit ids
instead of mlflow's global "active run" let a worker in another process join the run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from .errors import Interrupted


class Tracker:
    """Driver side. Use as a context manager: the run ends FINISHED, FAILED or KILLED."""

    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str]):
        self.uri = uri
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
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


class MetricSink:
    """Worker side: buffers step metrics and sends them in batches. A tracking server that is
    down must not stop training, so a failed send keeps the metrics (up to a cap) for the next
    flush and reports what was dropped."""

    MAX_BUFFERED = 100_000

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = MlflowClient(uri), run_id
        self.buffer: list[Metric] = []
        self.dropped = 0
        self._warned = False

    def add(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        overflow = len(self.buffer) - self.MAX_BUFFERED
        if overflow > 0:
            self.dropped += overflow
            del self.buffer[:overflow]

    def flush(self) -> None:
        try:
            while self.buffer:  # log_batch takes 1000 metrics per call; drop each once sent
                self.client.log_batch(self.run_id, metrics=self.buffer[:1000])
                del self.buffer[:1000]
        except Exception as err:  # noqa: BLE001 - any tracking failure is survivable here
            if not self._warned:
                print(f"[mlflow] could not log metrics ({err.__class__.__name__}); will retry", file=sys.stderr)
                self._warned = True

    def close(self) -> None:
        self.flush()
        lost = self.dropped + len(self.buffer)
        if lost:
            print(f"[mlflow] {lost} metric values could not be delivered", file=sys.stderr)
