"""`raylm runs`: the MLflow runs as a table or JSON, or a few side by side
(pipelines/track/runs.py): MLflow only, no Ray, no torch."""

from __future__ import annotations

import argparse
import json
import sys

from raylm.cli.common import Command, config_args, resolve_config
from raylm.errors import ConfigError
from raylm.fmt import redact


def runs_args(p: argparse.ArgumentParser) -> None:
    config_args(p)  # the config gives tracking.tracking_uri and tracking.experiment, nothing else
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="RUN",
        help="these runs side by side, with the params that differ (RUN: an MLflow run name, the newest "
        "of that name, or a run id prefix)",
    )
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="the MLflow store (default: tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    p.add_argument("--experiment", metavar="NAME", help="default: tracking.experiment (raylm)")
    filter_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON list of the rows instead of a table")


def filter_args(p: argparse.ArgumentParser) -> None:
    """Which runs the list shows, and in what order."""
    p.add_argument(
        "--stage",
        metavar="S",
        help="only runs of this stage: run, prepare, pretrain, evaluate, finetune, tune, trial or lm-eval",
    )
    p.add_argument(
        "--status",
        type=str.upper,
        choices=["RUNNING", "FINISHED", "FAILED", "KILLED"],
        help="only runs in this state (the table says RUNNING? for a run silent for 10 minutes: "
        "its driver may be gone)",
    )
    p.add_argument("--name", metavar="TEXT", help="only runs whose name contains TEXT (any case)")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="at most N runs (default 20)")
    p.add_argument(
        "--sort",
        choices=["start", "cost", "tokens", "best_val_loss"],
        default="start",
        help="start: the newest first (default); cost, tokens: the largest first; best_val_loss: the "
        "lowest first (reads every matching run: ~15 s for 1000 from sqlite)",
    )


def cmd_runs(args: argparse.Namespace) -> int:
    from raylm.pipelines.runtime import tracking_uri
    from raylm.pipelines.track.runs import (
        compare_json,
        compare_runs,
        format_runs,
        open_store,
    )  # mlflow: no Ray, no torch

    cfg = resolve_config(args)
    if args.limit < 1:
        raise ConfigError("runs: --limit must be at least 1")
    uri = tracking_uri(args.tracking_uri or cfg.tracking.tracking_uri)
    experiment = args.experiment or cfg.tracking.experiment
    with open_store(uri, experiment) as store:
        if args.compare:
            runs = [store.find_run(ref) for ref in args.compare]
            print(json.dumps(compare_json(store, runs), indent=2) if args.json else compare_runs(store, runs))
            return 0
        rows = store.list_runs(args.stage, args.status, args.name, args.sort, args.limit)
    if args.json:
        print(json.dumps([row.json() for row in rows], indent=2))
    elif rows:
        print(format_runs(rows))
    else:
        print(f"raylm: no matching runs in experiment '{experiment}' at {redact(uri)}", file=sys.stderr)
    return 0


COMMAND = Command(
    "runs",
    "list the MLflow runs, newest first, or compare a few side by side: no MLflow UI needed (no Ray)",
    runs_args,
    cmd_runs,
)
