"""`raylm tune`: a Ray Tune sweep over a config, its trials pretrain jobs (tuning/)."""

from __future__ import annotations

import argparse
from pathlib import Path

from raylm.cli.common import Command, address_arg, config_args, config_source, data_args
from raylm.config import load_raw, validate
from raylm.pipelines.runtime import check_tracking_uri


def tune_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    data_args(p)  # the driver prepares it, the trials read it
    p.add_argument(
        "--space", required=True, metavar="YAML", help="the sweep file: search space, algorithm, scheduler, budgets"
    )
    address_arg(p)
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        type=auto_only,
        metavar="auto",
        help="continue the interrupted sweep of this run.name; finished trials are kept. "
        "--resume auto: continue it if there is one, else start (what a cluster job's retry needs)",
    )


def auto_only(value: str) -> str:
    if value != "auto":
        raise argparse.ArgumentTypeError(f"takes no value, or 'auto' (got {value!r}; put the config before --resume)")
    return value


def cmd_tune(args: argparse.Namespace) -> int:
    from raylm.tuning.space import load_sweep  # pydantic and yaml only: no Ray yet

    path, overrides = config_source(args)
    raw = load_raw(path, overrides)
    cfg = validate(raw, str(path or "defaults"))
    spec = load_sweep(args.space, raw)
    check_tracking_uri(cfg.tracking.tracking_uri)
    from raylm.tuning.report import print_result
    from raylm.tuning.sweep import run_sweep  # imports Ray and torch

    out = run_sweep(raw, spec, Path(args.space).read_text(), args.address, args.resume)
    print_result(out, spec.metric)
    return 0


COMMAND = Command(
    "tune",
    "search architecture and hyperparameters with Ray Tune (trials are pretrain jobs); one MLflow run per sweep",
    tune_args,
    cmd_tune,
)
