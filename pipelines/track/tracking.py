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
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from raylm.errors import Interrupted
from raylm.fmt import redact
from raylm.pipelines.runtime import env_defaults, incompatible, private_module, require, unreachable

SYSTEM_METRICS_SECONDS = 10  # MLflow's default sampling interval: ~360 points per hour per metric
# The driver's writes where an outage is waited out (keep_undelivered): 2 quick retries (~5 s)
# and a 20 s timeout unless the environment says otherwise, not MLflow's 7 retries with backoff
# and 120 s each (minutes per call in an outage).
DRIVER_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


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
        self._attach(uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        self.experiment_id = exp_id
        self.monitor = start_system_metrics(uri, self.run_id) if system_metrics else None

    def _attach(self, uri: str, run_id: str | None = None) -> None:
        self.uri, self.client, self.run_id, self.monitor = uri, MlflowClient(uri), run_id, None
        # With keep_undelivered(): where what the server missed waits, and why it was missed.
        self.pending_dir: Path | None = None
        self.handlers: dict[str, Callable[[Tracker], None]] = {}
        self.outage: str | None = None
        self.undelivered: list[dict] = []
        self.final: dict | None = None  # the run's status and end time, once it ended without the server

    @classmethod
    def of_run(cls, uri: str, run_id: str) -> Tracker:
        """An existing run, to write to; it stays as it is (no status change)."""
        tracker = cls.__new__(cls)
        tracker._attach(uri, run_id)
        return tracker

    def keep_undelivered(self, folder: Path, handlers: dict[str, Callable[[Tracker], None]]) -> None:
        """From now on, a write the tracking server does not answer (an outage) costs the job
        nothing: it waits, with the run's final status, in <folder>/<run id>.json (artifacts
        copied next to it) for deliver_pending() of a later command. `handlers`: how to redo
        the deferred actions named by kind (the loss curve, read back from the run)."""
        self.pending_dir, self.handlers = folder, handlers

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
            with self._http():  # its last flush: a short try in an outage
                self.monitor.finish()
        end = int(time.time() * 1000)
        self.attempt(
            {"kind": "status", "status": RunStatus.to_string(status), "end_time": end},
            lambda: self.client.set_terminated(self.run_id, RunStatus.to_string(status), end),
        )
        if self.final and unreachable(self.uri) is None:  # back already: deliver now
            deliver_pending(self, self.pending_dir, self.handlers, only=self.run_id)
        elif self.final:
            self._report_undelivered()

    def attempt(self, action: dict, send: Callable[[], object]):
        """send()'s result; or, once the server is out (this call's failure or an earlier one's)
        and keep_undelivered() was called, None, with `action` (JSON: what send() does) kept
        for later. Any other failure raises."""
        if self.outage is None:
            try:
                with self._http():
                    return send()
            except Exception as err:
                if not self._went_out(err):
                    raise
        self._keep(action)
        return None

    def _http(self):
        """Short HTTP retries where an outage costs nothing (keep_undelivered); MLflow's own elsewhere."""
        return env_defaults(DRIVER_HTTP) if self.pending_dir is not None else nullcontext()

    def _went_out(self, err: Exception) -> bool:
        """Whether `err` was the server's outage (then kept actions replace writes from now on)."""
        self.outage = self._outage(err)
        if self.outage is not None:
            print(
                f"[mlflow] the tracking server at {redact(self.uri)} does not answer ({self.outage}): "
                f"keeping what run {self.run_id[:8]} logs from now on in {self.pending_dir}",
                file=sys.stderr,
                flush=True,
            )
        return self.outage is not None

    def _keep(self, action: dict) -> None:
        if action["kind"] == "status":
            self.final = {"status": action["status"], "end_time": action["end_time"]}
        else:
            self.undelivered.append(action)
        self._save()

    def _outage(self, err: Exception) -> str | None:
        """Why the server cannot take writes now, or None (then `err` is not an outage)."""
        if self.pending_dir is None or not self.uri.startswith(("http://", "https://")):
            return None
        reason = unreachable(self.uri)
        if reason is None and str(err).startswith("API request to"):  # MLflow's HTTP failure after its retries
            reason = redact(str(err).splitlines()[0])[:200]
        return reason

    def pending_file(self) -> Path:
        return self.pending_dir / f"{self.run_id}.json"

    def _save(self) -> None:
        record = {"run_id": self.run_id, "uri": redact(self.uri), "actions": self.undelivered, **(self.final or {})}
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.pending_file().with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.pending_file())

    def _report_undelivered(self) -> None:
        what = describe(self.undelivered + ([{"kind": "status", **self.final}] if self.final else []))
        print(
            f"[mlflow] the server at {redact(self.uri)} did not answer at the end of run {self.run_id[:8]}: "
            f"not delivered: {what}; kept in {self.pending_file()}; the next raylm command with this run.output_dir "
            "and tracking URI delivers them",
            file=sys.stderr,
            flush=True,
        )

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
        tags = {k: str(v) for k, v in tags.items()}

        def send():
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)

        self.attempt({"kind": "tags", "tags": tags}, send)

    def log_params(self, params: dict) -> None:
        """Values as text, any URI password masked (a tracking URI may carry one)."""
        texts = {k: redact(str(v))[:6000] for k, v in params.items()}
        self.attempt({"kind": "params", "params": texts}, lambda: self._send_params(texts))

    def _send_params(self, texts: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in texts.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        now = int(time.time() * 1000)
        self.attempt(
            {"kind": "metrics", "metrics": values, "step": step or 0, "timestamp": now},
            lambda: self._send_metrics(values, step or 0, now),
        )

    def _send_metrics(self, values: dict[str, float], step: int, timestamp: int) -> None:
        batch = [Metric(k, v, timestamp, step) for k, v in values.items()]
        for i in range(0, len(batch), 1000):  # log_batch takes at most 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file or folder; in an outage, a copy of it waits (the original may be temporary)."""
        if self.outage is None:
            try:
                with self._http():
                    return self._send_artifact(path, artifact_path)
            except Exception as err:
                if not self._went_out(err):
                    raise
        copy = self.pending_dir / self.run_id / f"{len(self.undelivered):04d}" / path.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, copy, dirs_exist_ok=True)
        else:
            shutil.copy2(path, copy)
        self._keep({"kind": "artifact", "path": str(copy), "artifact_path": artifact_path})

    def _send_artifact(self, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.attempt(
            {"kind": "text", "text": text, "name": name}, lambda: self.client.log_text(self.run_id, text, name)
        )

    def log_dataset(self, folder: str, seq_len: int, name: str, context: str) -> None:
        """Prepared data as the run's input (the run page's "Datasets used"): its `folder`, the
        folder's fingerprint name as digest, and the token windows' shape (seq_len + 1) as schema."""
        self.attempt(
            {"kind": "dataset", "folder": folder, "seq_len": seq_len, "name": name, "context": context},
            lambda: self._send_dataset(folder, seq_len, name, context),
        )

    def _send_dataset(self, folder: str, seq_len: int, name: str, context: str) -> None:
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

    def register_model(self, name: str, artifact_path: str = "model") -> int | None:
        """A new version of registered model `name` (created if new) from this run's artifact;
        None in an outage (registered when what the server missed is delivered)."""
        return self.attempt(
            {"kind": "register", "name": name, "artifact_path": artifact_path},
            lambda: self._register(name, artifact_path),
        )

    def _register(self, name: str, artifact_path: str) -> int:
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
        self.attempt(
            {"kind": "table", "data": data, "name": name},
            lambda: self.client.log_table(self.run_id, data=data, artifact_file=name),
        )

    def redo(self, action: dict) -> None:
        """Send one action attempt() kept; raises if the server fails again."""
        kind = action["kind"]
        if kind == "metrics":
            self._send_metrics(action["metrics"], action["step"], action["timestamp"])
        elif kind == "params":
            self._send_params(action["params"])
        elif kind == "tags":
            for key, value in action["tags"].items():
                self.client.set_tag(self.run_id, key, value)
        elif kind == "artifact":
            self._send_artifact(Path(action["path"]), action["artifact_path"])
        elif kind == "text":
            self.client.log_text(self.run_id, action["text"], action["name"])
        elif kind == "table":
            self.client.log_table(self.run_id, data=action["data"], artifact_file=action["name"])
        elif kind == "dataset":
            self._send_dataset(action["folder"], action["seq_len"], action["name"], action["context"])
        elif kind == "register":
            version = self._register(action["name"], action["artifact_path"])
            print(f"[mlflow] registered model {action['name']!r} version {version}", flush=True)
        else:
            self.handlers[kind](self)


def describe(actions: list[dict]) -> str:
    """What kept actions hold, in a few words: model/, plots/, 3 metrics, 2 tags, status FINISHED."""
    parts: list[str] = []
    counts: dict[str, int] = {}
    for a in actions:
        kind = a["kind"]
        if kind == "artifact":
            parts.append(f"{a['artifact_path']}/" if a["artifact_path"] else Path(a["path"]).name)
        elif kind in ("text", "table"):
            parts.append(a["name"])
        elif kind == "register":
            parts.append(f"registration of model {a['name']!r}")
        elif kind == "loss_curve":
            parts.append("plots/ (the loss curve)")
        elif kind == "dataset":
            parts.append("the dataset input")
        elif kind == "status":
            continue
        else:
            counts[kind] = counts.get(kind, 0) + len(a[kind])
    parts += [f"{n} {kind[:-1] if n == 1 else kind}" for kind, n in counts.items()]
    parts += [f"status {a['status']}" for a in actions if a["kind"] == "status"]
    return ", ".join(dict.fromkeys(parts))


def deliver_pending(
    tracker: Tracker, folder: Path, handlers: dict[str, Callable[[Tracker], None]], only: str | None = None
) -> list[str]:
    """What earlier runs' drivers kept in `folder` during an outage of this tracker's server,
    delivered, and each run's final status set with its real end time; their files are then
    deleted. Runs of another store are left alone; one the server fails again keeps what is
    left, for the next command. `only`: that run's file alone. Returns the ids of the runs fully delivered."""
    done = []
    for file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = json.loads(file.read_text())
        if record.get("uri") != redact(tracker.uri) or only not in (None, record["run_id"]):
            continue
        run = Tracker.of_run(tracker.uri, record["run_id"])
        run.handlers = handlers
        actions, what = record["actions"], describe(record["actions"])
        try:
            with env_defaults(DRIVER_HTTP):
                while actions:
                    run.redo(actions[0])
                    actions.pop(0)
                if record.get("status"):
                    run.client.set_terminated(run.run_id, record["status"], record["end_time"])
        except Exception as err:  # noqa: BLE001 - a later command tries again; this one goes on
            file.write_text(json.dumps(record, indent=1))
            print(
                f"[mlflow] could not yet deliver what run {run.run_id[:8]} kept in {file} "
                f"({redact(str(err).splitlines()[0] if str(err) else err.__class__.__name__)[:200]}): "
                "a later command tries again",
                file=sys.stderr,
                flush=True,
            )
            continue
        file.unlink()
        shutil.rmtree(folder / run.run_id, ignore_errors=True)
        status = f"; marked {record['status']}" if record.get("status") else ""
        print(
            f"[mlflow] delivered to run {run.run_id[:8]} what the server missed at its end: {what}{status}", flush=True
        )
        done.append(run.run_id)
    return done


def start_system_metrics(uri: str, run_id: str):
    """MLflow's system-metrics monitor on this run, or None where it cannot start (no psutil).
    It stops by itself once the run has ended, or when the server cannot be reached."""
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # not "Started/Stopping monitoring"
    # Its warnings in an outage ("Failed to get mlflow run: API request to <URI> ...") carry the
    # tracking URI, password included: masked.
    monitor_log = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
    if not any(isinstance(f, RedactingFilter) for f in monitor_log.filters):
        monitor_log.addFilter(RedactingFilter())
    if importlib.util.find_spec("psutil") is None:  # MLflow's CPU monitor needs it; MLflow does not require it
        print("[mlflow] system metrics are off: psutil is not installed", file=sys.stderr)
        return None
    monitor = system_metrics_monitor()(run_id, sampling_interval=SYSTEM_METRICS_SECONDS, tracking_uri=uri)
    monitor.start()
    return monitor


class RedactingFilter(logging.Filter):
    """A logger's records with any URI password masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


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
    an outage with MLflow's HTTP retries, would otherwise stall every flush). The thread sends
    every SEND_SECONDS and when asked (flush: after an evaluation or a checkpoint, and at the
    end); before a checkpoint the loop waits for delivery (deliver), so that a relaunch from
    that checkpoint finds every earlier step in MLflow. A failed send keeps the metrics (up to
    a cap) for the next try; close() reports what never arrived."""

    MAX_BUFFERED = 100_000
    # Measured on 2 cores against `mlflow server` with a sqlite store: one log_batch costs the
    # server ~9 ms of CPU plus ~0.085 ms per value, and the sender ~3 ms plus ~0.02 ms per value.
    # Sending every 10 steps of the quickstart model (~0.3 s) spent ~5% of the machine on the
    # fixed part alone; every 5 s it is ~0.2% of a core, and the per-value part is what is left.
    SEND_SECONDS = 5.0
    CLOSE_SECONDS = 30.0  # at the end, how long to keep trying to deliver the rest
    # One log_batch takes ~12 ms here; the bound is for a server that hangs without failing.
    DELIVER_SECONDS = 10.0

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = MlflowClient(uri), run_id
        self.buffer: list[Metric] = []
        self.dropped = 0  # oldest metrics discarded past MAX_BUFFERED
        self.held = 0  # metrics that waited out an outage and were delivered after it
        self._lock, self._wake, self._closing = threading.Lock(), threading.Event(), False
        self._settled_changed = threading.Condition(self._lock)
        self._added = self._settled = 0  # metrics added; of them, sent or dropped (FIFO order)
        self._outage_since: float | None = None
        self._sender = threading.Thread(target=self._send_loop, daemon=True, name="raylm-mlflow-sink")
        self._sender.start()

    def add(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            self.buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
            self._added += len(metrics)
            overflow = len(self.buffer) - self.MAX_BUFFERED
            if overflow > 0:
                self.dropped += overflow
                self._settled += overflow
                del self.buffer[:overflow]

    def flush(self) -> None:
        """Ask the sender to deliver what is buffered; returns at once."""
        self._wake.set()

    def deliver(self) -> None:
        """Send what is buffered and wait until it has arrived (at most DELIVER_SECONDS): called
        before a checkpoint, because a driver killed after the save takes the workers, and the
        metrics they still hold, with it. In an outage it does not wait: they stay held."""
        with self._settled_changed:
            target = self._added
            self._wake.set()
            self._settled_changed.wait_for(
                lambda: self._settled >= target or self._outage_since is not None, timeout=self.DELIVER_SECONDS
            )

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
            self._wake.wait(timeout=self.SEND_SECONDS)
            self._wake.clear()
            while self._send_some():
                pass
            with self._lock:
                pending = bool(self.buffer)
            if self._closing and not pending:
                return  # else (an outage) try again in SEND_SECONDS until close() stops waiting

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
                print(
                    f"[mlflow] could not log metrics ({err.__class__.__name__}); holding them and retrying "
                    f"every {self.SEND_SECONDS:g} s",
                    file=sys.stderr,
                )
                with self._settled_changed:
                    self._outage_since = time.monotonic()
                    self._settled_changed.notify_all()
            return False
        with self._settled_changed:  # add() appends, and trims the front only past MAX_BUFFERED
            sent = max(0, len(batch) - (self.dropped - dropped_before))
            del self.buffer[:sent]
            self._settled += sent
            self._settled_changed.notify_all()
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
