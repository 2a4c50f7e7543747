"""What every command group shares: the table entry of a command, the config arguments
(CONFIG, --config, --set), the data flags of every command that reads the data section, the
flags that set config keys, and the model directory check."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from raylm.config import RaylmConfig, load_config
from raylm.errors import ConfigError

if TYPE_CHECKING:
    from raylm.storage import Location


@dataclass(frozen=True)
class Command:
    """One `raylm NAME`: its help line, what adds its arguments, and the handler that runs it
    (None where add_args gives each of its actions its own)."""

    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int] | None
    usage: str | None = None
    epilog: str | None = None


# argparse expands a unique prefix of a flag by default: `evaluate --data x` once meant
# `--data-dir x`, silently. Every parser here takes only whole flags.
ALLOW_ABBREV = False


def add_commands(parser: argparse.ArgumentParser, commands: Sequence[Command], dest: str, metavar: str) -> None:
    sub = parser.add_subparsers(dest=dest, required=True, metavar=metavar)
    for command in commands:
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.help,
            usage=command.usage,
            epilog=command.epilog,
            allow_abbrev=ALLOW_ABBREV,
        )
        command.add_args(p)
        if command.handler is not None:
            p.set_defaults(func=command.handler)


def parser_for(commands: Sequence[Command]) -> argparse.ArgumentParser:
    """`raylm` with these commands."""
    parser = argparse.ArgumentParser(
        prog="raylm", description="Train language models end to end on Ray.", allow_abbrev=ALLOW_ABBREV
    )
    add_commands(parser, commands, "command", "COMMAND")
    return parser


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (default: built-in quickstart defaults)")
    p.add_argument("--config", dest="config_flag", metavar="CONFIG", help="same as the positional CONFIG")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by its dotted path, e.g. --set train.lr=3e-4 (repeatable)",
    )


def data_args(p: argparse.ArgumentParser) -> None:
    """--data, on every command that reads the data section: a later stage finds the data an
    earlier one prepared by the same sources, so each must be given the same --data."""
    p.add_argument(
        "--data",
        action="append",
        metavar="PATH",
        help="file, directory, glob or URI of the corpus; each --data is one source (replaces data.sources); "
        "give every stage of a run the same ones",
    )


def address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local instance)")


def _sources(paths: list[str]) -> list[dict]:
    return [{"paths": [p]} for p in paths]  # one source per flag, in the order given


def _absolute(path: str) -> str:
    return str(Path(path).resolve())


# Command-line flags and the config keys they set (flag, key, value from the flag's value).
FLAG_KEYS = [
    ("data", "data.sources", _sources),
    ("base", "finetune.base", _absolute),
    ("sft", "finetune.sft.sources", _sources),
    ("lora", "finetune.lora.enabled", bool),
    ("task", "eval.tasks", list),
    ("data_dir", "eval.task_data_dir", str),
    ("text", "eval.texts", lambda paths: [_absolute(p) for p in paths]),
    ("limit", "eval.task_limit", int),
]


def resolve_config(args: argparse.Namespace) -> RaylmConfig:
    return load_config(*config_source(args))


def config_source(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The config file and the overrides: command-line flags first, so that a --set can
    refine what they give."""
    if args.config and args.config_flag:
        raise ConfigError("give the config either as CONFIG or as --config, not both")
    overrides = [
        f"{key}={json.dumps(value(getattr(args, flag)))}" for flag, key, value in FLAG_KEYS if getattr(args, flag, None)
    ]
    return args.config or args.config_flag, overrides + list(args.overrides)


def model_dir(path: str | Path | Location, flag: str) -> Location:
    """A model or checkpoint directory (a path or an s3:// gs:// URI) whose weights are safetensors."""
    from raylm.models.io import check_weights  # safetensors and torch: after the config has validated
    from raylm.storage import locate

    check_weights(locate(path), flag)
    return locate(path)
