"""The `raylm` command line: COMMANDS is the table of commands, each from the module of its
group (stages, models, tune, cluster, cost, runs), which adds its arguments and handles it.
Heavy imports (Ray, torch, MLflow, Kubernetes) wait inside the handlers until the config has
validated, so a bad config fails in about a second, before any worker starts."""

from __future__ import annotations

import argparse
import sys

from raylm.cli import cluster, cost, models, runs, stages, tune
from raylm.cli.common import Command, parser_for
from raylm.cli.quiet import drop_harmless_stderr
from raylm.errors import Interrupted, RaylmError

# In `raylm --help` order.
COMMANDS: list[Command] = [
    *stages.COMMANDS,
    models.LM_EVAL,
    models.GENERATE,
    models.EXPORT_HF,
    tune.COMMAND,
    cluster.CLUSTER,
    models.IMPORT_HF,
    cost.COMMAND,
    runs.COMMAND,
    cluster.SUBMIT,
]


def build_parser() -> argparse.ArgumentParser:
    return parser_for(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a `raylm` process (the console script, python -m raylm); not a caller in-process
        drop_harmless_stderr()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as err:
        print(f"raylm: {err}", file=sys.stderr)
        return err.exit_code
    except RaylmError as err:
        print(f"raylm: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("raylm: interrupted", file=sys.stderr)
        return 130
