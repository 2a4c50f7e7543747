"""`raylm runs`: the MLflow runs raylm wrote, listed and compared in a terminal, for when the
MLflow UI is not at hand. Reads the store with MlflowClient only (no Ray, no torch), so a
listing takes about as long as importing mlflow (~1.5 s)."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from raylm.errors import ConfigError, DataError
from raylm.fmt import duration, money, redact
from raylm.pipelines.runtime import env_defaults, unreachable

STALE_SECONDS = 10 * 60  # a RUNNING run silent this long may have lost its driver (flagged "RUNNING?")
# Sorts the server can do, the newest first among ties; a run without the metric comes last.
SERVER_SORTS = {
    "start": ["attributes.start_time DESC"],
    "cost": ["metrics.cost_usd DESC", "attributes.start_time DESC"],
    "tokens": ["metrics.tokens_seen DESC", "attributes.start_time DESC"],
}
PAGE = 1000  # runs per search request (each comes with its ~300 params: ~9 s for 1000 on sqlite)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@dataclass
class Row:
    """One run, as the table and --json show it; None where the run did not log the metric."""

    name: str
    stage: str | None
    status: str  # "RUNNING?" when RUNNING but silent for STALE_SECONDS
    start_ms: int
    end_ms: int | None
    steps: int | None  # the step of the last train_loss
    tokens: float | None  # the last tokens_seen
    best_val_loss: float | None
    bits_per_byte: float | None
    cost_usd: float | None
    run_id: str

    def seconds(self) -> float:
        end = self.end_ms if self.end_ms else time.time() * 1000
        return (end - self.start_ms) / 1000

    def json(self) -> dict:
        return {
            "name": self.name,
            "stage": self.stage,
            "status": self.status,
            "started": datetime.fromtimestamp(self.start_ms / 1000).astimezone().isoformat(timespec="seconds"),
            "seconds": round(self.seconds(), 1),
            "steps": self.steps,
            "tokens": self.tokens,
            "best_val_loss": self.best_val_loss,
            "bits_per_byte": self.bits_per_byte,
            "cost_usd": self.cost_usd,
            "run_id": self.run_id,
        }


class Store:
    """One experiment of an MLflow tracking store, read through MlflowClient."""

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(sorted(e.name for e in self.client.search_experiments())) or "none"
            raise DataError(
                f"no experiment '{experiment}' at {redact(uri)} (experiments: {names}; pick one with --experiment)"
            )
        self.experiment_id = exp.experiment_id

    def list_runs(
        self,
        stage: str | None = None,
        status: str | None = None,
        name: str | None = None,
        sort: str = "start",
        limit: int = 20,
    ) -> list[Row]:
        """The first `limit` runs matching the filters in `sort` order. The best validation loss
        needs a metric history, one request per run: read for the rows shown, except that
        sorting by it reads every matching run: 1000 took ~15 s from sqlite and ~50 s from a
        local `mlflow server` on 2 cores, mostly the search, which brings each run's ~300 params."""
        query = _filter(stage, status, name)
        if sort in SERVER_SORTS:
            return self.rows(
                self.client.search_runs([self.experiment_id], query, max_results=limit, order_by=SERVER_SORTS[sort])
            )
        rows = self.rows(self._all_runs(query))
        return sorted(rows, key=lambda r: (r.best_val_loss is None, r.best_val_loss or 0.0))[:limit]

    def rows(self, runs: list) -> list[Row]:
        """Rows of the runs, 8 history requests at a time: a server answered 4x faster so
        (15 ms a run instead of 59), sqlite the same."""
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(self.row, runs))

    def _all_runs(self, query: str) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], query, max_results=PAGE, page_token=token)
            runs += page
            token = page.token
            if not token:
                return runs

    def find_run(self, ref: str):
        """A run by its MLflow run name (the newest of several, said on stderr), else by a
        prefix of its id."""
        named = self.client.search_runs(
            [self.experiment_id], f"attributes.run_name = {_quoted(ref)}", order_by=["attributes.start_time DESC"]
        )
        if len(named) > 1:
            print(
                f"raylm: {len(named)} runs are named '{ref}': using the newest, {named[0].info.run_id[:8]}",
                file=sys.stderr,
            )
        if named:
            return named[0]
        by_id = self.client.search_runs(
            [self.experiment_id], f"attributes.run_id LIKE {_quoted(ref + '%')}", max_results=2
        )
        if len(by_id) > 1:
            raise ConfigError(f"runs: several run ids start with '{ref}': give more of it")
        if not by_id:
            raise ConfigError(
                f"runs: no run named '{ref}', nor with an id starting so, in experiment "
                f"'{self.experiment}' at {redact(self.uri)}"
            )
        return by_id[0]

    def best_val_loss(self, run) -> float | None:
        """The lowest validation loss in training's history (run.data holds only the last
        value); a run without one (`raylm evaluate`) has its final score, over the whole split."""
        if "val_loss" in run.data.metrics:
            return min(m.value for m in self.client.get_metric_history(run.info.run_id, "val_loss"))
        return run.data.metrics.get("final_val_loss")

    def row(self, run) -> Row:
        latest = {m.key: m for m in run.data.to_proto().metrics}  # the last value of each, with its step and time
        metrics, info = run.data.metrics, run.info
        return Row(
            name=info.run_name,
            stage=run.data.tags.get("raylm.stage"),
            status=_status(info, latest),
            start_ms=info.start_time,
            end_ms=info.end_time,
            steps=latest["train_loss"].step if "train_loss" in latest else None,
            tokens=metrics.get("tokens_seen"),
            best_val_loss=self.best_val_loss(run),
            bits_per_byte=metrics.get("final_val_bits_per_byte", metrics.get("val_bits_per_byte")),
            cost_usd=metrics.get("cost_usd"),
            run_id=info.run_id,
        )


@contextmanager
def open_store(uri: str, experiment: str):
    """A Store for a block that reads it; MLflow's failures end the block as one-line DataErrors."""
    _check_store(uri)
    try:
        with env_defaults(HTTP_DEFAULTS):  # one try, 10 s: MLflow's 7 retries of 120 s wait minutes
            yield Store(uri, experiment)
    except MlflowException as err:
        raise DataError(f"cannot read MLflow runs at {redact(uri)}: {redact(str(err).splitlines()[0])}") from None


def _check_store(uri: str) -> None:
    """A server that does not answer, in a line; a missing sqlite file, which MLflow would
    create (printing its migrations), as missing."""
    if uri.startswith(("http://", "https://")):
        reason = unreachable(uri)
        if reason:
            raise DataError(f"no MLflow server answers at {redact(uri)} ({reason}): check --tracking-uri")
    elif uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise DataError(f"no MLflow store at {uri} (give --tracking-uri, or run where the runs' mlflow.db is)")


def _filter(stage: str | None, status: str | None, name: str | None) -> str:
    clauses = [
        f"tags.`raylm.stage` = {_quoted(stage)}" if stage else "",
        f"attributes.status = {_quoted(status)}" if status else "",
        f"attributes.run_name ILIKE {_quoted(f'%{name}%')}" if name else "",
    ]
    return " AND ".join(c for c in clauses if c)


def latest_run(client: MlflowClient, experiment: str, run_name: str, stage: str):
    """The newest MLflow run of raylm's run.name `run_name` and `stage`, found by the tags every
    raylm run carries (MLflow's own run names add the model size and a random suffix)."""
    found = client.get_experiment_by_name(experiment)
    query = f"tags.`raylm.run_name` = {_quoted(run_name)} AND tags.`raylm.stage` = {_quoted(stage)}"
    runs = (
        client.search_runs([found.experiment_id], query, max_results=1, order_by=["attributes.start_time DESC"])
        if found
        else []
    )
    if not runs:
        raise DataError(f"no {stage} run with run.name {run_name!r} in experiment {experiment!r}")
    return runs[0]


def _quoted(value: str) -> str:
    """A string literal for MLflow's filter syntax, which has no escapes: either quote works."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"runs: {value!r} holds both quote characters, which MLflow's search cannot match")


def _status(info, latest: dict) -> str:
    if info.status != "RUNNING":
        return info.status
    last_ms = max([m.timestamp for m in latest.values()] + [info.start_time])
    return "RUNNING?" if time.time() - last_ms / 1000 > STALE_SECONDS else "RUNNING"


def format_runs(rows: list[Row]) -> str:
    header = [
        "name",
        "stage",
        "status",
        "started",
        "duration",
        "steps",
        "tokens",
        "best val",
        "bits/byte",
        "cost",
        "run id",
    ]
    body = [
        [
            r.name,
            r.stage or "-",
            r.status,
            _started(r.start_ms),
            duration(r.seconds()),
            _shown(r.steps, _steps),
            _shown(r.tokens, _count),
            _shown(r.best_val_loss, _loss),
            _shown(r.bits_per_byte, _loss),
            _shown(r.cost_usd, money),
            r.run_id[:8],
        ]
        for r in rows
    ]
    return _table([header, *body], numeric=range(4, 10))


def _table(rows: list[list[str]], numeric: range) -> str:
    """Columns two spaces apart; the `numeric` ones right-aligned, so that digits line up."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    )


def _shown(value, fmt) -> str:
    return "-" if value is None else fmt(value)


def _loss(value: float) -> str:
    return f"{value:.4f}"


def _steps(value: int) -> str:
    return f"{value:,}"


def _count(value: float) -> str:
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def _percent(value: float) -> str:
    return f"{value:.1%}"


def _started(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


# What compare shows beyond a list row: (label, metric, format).
DETAIL_METRICS = [
    ("final val loss", "final_val_loss", _loss),
    ("train time", "train_seconds", duration),
    ("total time", "total_seconds", duration),
    ("tokens/s", "tokens_per_s", _count),
    ("MFU", "mfu", _percent),
]


def compare_runs(store: Store, runs: list) -> str:
    """The runs side by side: a list row's columns, DETAIL_METRICS, then the params (config
    keys) whose values differ."""
    rows = store.rows(runs)
    lines = [
        ["", *[r.name for r in rows]],
        ["run id", *[r.run_id[:8] for r in rows]],
        ["stage", *[r.stage or "-" for r in rows]],
        ["status", *[r.status for r in rows]],
        ["started", *[_started(r.start_ms) for r in rows]],
        ["duration", *[duration(r.seconds()) for r in rows]],
        ["steps", *[_shown(r.steps, _steps) for r in rows]],
        ["tokens", *[_shown(r.tokens, _count) for r in rows]],
        ["best val loss", *[_shown(r.best_val_loss, _loss) for r in rows]],
        ["bits/byte", *[_shown(r.bits_per_byte, _loss) for r in rows]],
        ["cost", *[_shown(r.cost_usd, money) for r in rows]],
    ]
    lines += [[label, *[_shown(run.data.metrics.get(key), fmt) for run in runs]] for label, key, fmt in DETAIL_METRICS]
    params = differing_params(runs)
    lines += [[key, *[_clipped(run.data.params.get(key, "-")) for run in runs]] for key in params]
    table = _table(lines, numeric=range(1, len(runs) + 1))
    return table + "\n(every param is the same)" if len(runs) > 1 and not params else table


def compare_json(store: Store, runs: list) -> list[dict]:
    """compare_runs' content: each run's list row, DETAIL_METRICS and differing params."""
    params = differing_params(runs)
    return [
        row.json()
        | {key: run.data.metrics.get(key) for _, key, _ in DETAIL_METRICS}
        | {"params": {key: run.data.params.get(key) for key in params}}
        for row, run in zip(store.rows(runs), runs)
    ]


def _clipped(value: str, width: int = 40) -> str:
    """A param in a column of its own: data.sources and the like hold whole JSON lists."""
    return value if len(value) <= width else value[: width - 3] + "..."


def differing_params(runs: list) -> list[str]:
    """The params whose value is not the same in every run (a missing one counts as a value)."""
    keys = sorted({key for run in runs for key in run.data.params})
    return [key for key in keys if len({run.data.params.get(key) for run in runs}) > 1]
