"""MLflow: one run per raylm command, written through MlflowClient with explicit run ids.

The driver opens the run (config, data report, artifacts, final metrics); rank 0 of the
training workers streams step metrics into the same run through a MetricSink. Explicit ids
instead of mlflow's global "active run" let a worker in another process join the run.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from raylm.errors import Interrupted
from raylm.fmt import redact
from raylm.pipelines.runtime import incompatible, private_module, require

SYSTEM_METRICS_SECONDS = 10  # MLflow's default sampling interval: ~360 points per hour per metric


class Tracker:
    """Driver side. Use as a context manager: the run ends FINISHED, FAILED or KILLED."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        tags: dict[str, str],
        run_id: str | None = None,
        system_metrics: bool = False,
    ):
        """A new run; or, given `run_id`, that run again (a resumed sweep or trial), RUNNING.
        With system_metrics, this machine's CPU, memory, disk, network (and GPU, where pynvml
        finds one) are logged as system/* every SYSTEM_METRICS_SECONDS while the run is open."""
        # MLflow prints "View run ... at: <tracking URI>" as a run ends, password included if the
        # URI has one; raylm's summary prints the link with the password masked instead.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
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
        self.monitor = start_system_metrics(uri, self.run_id) if system_metrics else None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            status = RunStatus.FINISHED
        elif issubclass(exc_type, (KeyboardInterrupt, Interrupted)):
            status = RunStatus.KILLED
        else:
            status = RunStatus.FAILED
        if self.monitor:
            self.monitor.finish()
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))

    def retire_orphans(self, run_name: str, stage: str) -> list[str]:
        """Mark KILLED the runs of this run.name and stage left RUNNING by a driver that died (a
        SIGKILL, a lost node): a relaunch takes over their checkpoints, so none is still live,
        unless its driver is a process on this host that still exists, which is left alone.
        Returns their ids."""
        query = (
            f"tags.`raylm.run_name` = '{run_name}' and tags.`raylm.stage` = '{stage}' and attributes.status = 'RUNNING'"
        )
        retired = []
        for run in self.client.search_runs([self.experiment_id], filter_string=query):
            if run.info.run_id == self.run_id or driver_alive(run.data.tags):
                continue
            self.client.set_tag(
                run.info.run_id, "raylm.end_reason", "its driver died; marked KILLED by the next launch"
            )
            self.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            print(
                f"[mlflow] run {run.info.run_name} ({run.info.run_id[:8]}) was left RUNNING by a driver that died: "
                "marked KILLED",
                flush=True,
            )
            retired.append(run.info.run_id)
        return retired

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_params(self, params: dict) -> None:
        """Values as text, any URI password masked (a tracking URI may carry one)."""
        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
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

    def log_dataset(self, folder: str, seq_len: int, name: str, context: str) -> None:
        """Prepared data as the run's input (the run page's "Datasets used"): its `folder`, the
        folder's fingerprint name as digest, and the token windows' shape (seq_len + 1) as schema."""
        import numpy as np
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.types import Schema, TensorSpec

        path = Path(folder)
        schema = Schema([TensorSpec(np.dtype("int32"), (-1, seq_len + 1), "tokens")])
        meta = MetaDataset(LocalArtifactDatasetSource(str(path)), name=name, digest=path.name[:36], schema=schema)
        # The entity from the dataset's public dict (name, digest, source, source_type, schema).
        fields = meta.to_dict()
        keys = ("name", "digest", "source_type", "source", "schema", "profile")
        dataset = Dataset(**{k: fields.get(k) for k in keys})
        tag = InputTag(key="mlflow.data.context", value=context)
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags=[tag])])

    def register_model(self, name: str, artifact_path: str = "model") -> int:
        """A new version of registered model `name` (created if new) from this run's artifact."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        return int(self.client.create_model_version(name, source, run_id=self.run_id).version)

    def log_table(self, rows: list[dict], name: str) -> None:
        """Rows as an MLflow table artifact; list values (options, references) as JSON text."""
        columns = sorted({k for row in rows for k in row})
        data = {c: [json.dumps(r.get(c)) if isinstance(r.get(c), list) else r.get(c) for r in rows] for c in columns}
        self.client.log_table(self.run_id, data=data, artifact_file=name)


def start_system_metrics(uri: str, run_id: str):
    """MLflow's system-metrics monitor on this run, or None where it cannot start (no psutil).
    It stops by itself once the run has ended, or when the server cannot be reached."""
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # not "Started/Stopping monitoring"
    if importlib.util.find_spec("psutil") is None:  # MLflow's CPU monitor needs it; MLflow does not require it
        print("[mlflow] system metrics are off: psutil is not installed", file=sys.stderr)
        return None
    monitor = system_metrics_monitor()(run_id, sampling_interval=SYSTEM_METRICS_SECONDS, tracking_uri=uri)
    monitor.start()
    return monitor


def system_metrics_monitor(module=None):
    """MLflow's SystemMetricsMonitor class, checked. MLflow's public switch for it
    (mlflow.enable_system_metrics_logging) only covers runs that mlflow.start_run opens, and
    raylm's runs are MlflowClient runs with explicit ids, joined from other processes; so raylm
    starts the monitor itself, through a class MLflow does not document: a version that moves it
    or changes what raylm calls fails here, in one line (`module`: a stand-in, in tests)."""
    module = module or private_module("mlflow.system_metrics.system_metrics_monitor", "mlflow")
    monitor = require(module, "SystemMetricsMonitor", "mlflow")
    require(monitor, "start", "mlflow")
    require(monitor, "finish", "mlflow")
    params = inspect.signature(monitor).parameters
    for name in ("run_id", "sampling_interval", "tracking_uri"):
        if name not in params:
            raise incompatible(f"SystemMetricsMonitor({name}=...)", "mlflow")
    return monitor


def driver_alive(tags: dict[str, str]) -> bool:
    """Whether the run's driver is a live process on this host (False when it ran elsewhere)."""
    pid = tags.get("raylm.driver_pid", "")
    if tags.get("raylm.host") != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        self.held = 0  # metrics that waited out an outage and were delivered after it
        self._lock, self._wake, self._closing = threading.Lock(), threading.Event(), False
        self._outage_since: float | None = None
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
        elif self.held:
            print(
                f"[mlflow] every metric value was delivered ({self.held} of them after a tracking server outage)",
                file=sys.stderr,
            )

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
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                print(
                    f"[mlflow] could not log metrics ({err.__class__.__name__}); holding them and retrying "
                    f"every {self.RETRY_SECONDS:g} s",
                    file=sys.stderr,
                )
            return False
        with self._lock:  # add() appends, and trims the front only past MAX_BUFFERED
            del self.buffer[: max(0, len(batch) - (self.dropped - dropped_before))]
            waiting = len(self.buffer)
        if self._outage_since is not None:
            self.held += len(batch) + waiting
            print(
                f"[mlflow] the tracking server answers again after {time.monotonic() - self._outage_since:.0f} s: "
                f"delivering the {len(batch) + waiting} metric values held meanwhile",
                file=sys.stderr,
            )
            self._outage_since = None
        return True
