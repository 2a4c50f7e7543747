"""`raylm run|prepare|pretrain|evaluate|finetune`: the lifecycle's stages, their arguments, the
checks that refuse bad input before Ray starts, and the end-of-run summary."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from raylm.cli.common import Command, address_arg, config_args, data_args, model_dir, resolve_config
from raylm.config import RaylmConfig
from raylm.errors import ConfigError, DataError
from raylm.fmt import redact
from raylm.pipelines.data.manifest import Manifest
from raylm.pipelines.runtime import check_tracking_uri

STAGES = {
    "run": ("prepare", "pretrain", "evaluate"),
    "prepare": ("prepare",),
    "pretrain": ("pretrain",),
    "evaluate": ("evaluate",),
    "finetune": ("finetune", "evaluate"),
}


def follow_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="checkpoint directory or s3:// gs:// URI (default: the run's latest)")
    p.add_argument(
        "--follow",
        action="store_true",
        help="score each new checkpoint of the run as training writes it, until the last step",
    )
    p.add_argument(
        "--idle-minutes",
        type=float,
        default=30.0,
        metavar="M",
        help="with --follow: stop after M minutes without a new checkpoint (default 30)",
    )


def finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base",
        metavar="PATH",
        help="checkpoint, raylm model directory or Hugging Face Llama directory (finetune.base)",
    )
    p.add_argument(
        "--sft",
        action="append",
        metavar="JSONL",
        help="instruction data; each --sft is one source, format detected (replaces finetune.sft.sources)",
    )
    p.add_argument(
        "--lora",
        action="store_true",
        help="train LoRA adapters instead of every weight (finetune.lora.enabled)",
    )


def eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        action="append",
        metavar="YAML",
        help="also score a task (configs/tasks/*.yaml); repeatable (replaces eval.tasks)",
    )
    p.add_argument("--data-dir", metavar="DIR", help="the folder task files' paths are under (eval.task_data_dir)")
    p.add_argument("--limit", type=int, metavar="N", help="score the first N examples of each task")
    p.add_argument(
        "--text",
        action="append",
        metavar="FILE",
        help="also score loss, perplexity and bits per byte on a text file (repeatable; eval.texts)",
    )


def resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        metavar="PATH",
        help="start from this checkpoint directory or s3:// gs:// URI (a run's own checkpoints, if any, win)",
    )


def stage_args(*groups: Callable[[argparse.ArgumentParser], None]) -> Callable[[argparse.ArgumentParser], None]:
    """The config arguments and --address, then these groups' flags."""

    def add(p: argparse.ArgumentParser) -> None:
        config_args(p)
        address_arg(p)
        for group in groups:
            group(p)

    return add


def cmd_stages(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    check_inputs(args, cfg)
    check_tracking_uri(cfg.tracking.tracking_uri)
    if getattr(args, "follow", False):
        from raylm.pipelines.jobs import follow_run

        tracker = follow_run(cfg, args.address, args.idle_minutes)
        print(f"  MLflow      run {tracker.run_id} in experiment '{cfg.tracking.experiment}' at {redact(tracker.uri)}")
        return 0
    from raylm.pipelines.jobs import run_lifecycle  # imports Ray and torch

    out = run_lifecycle(
        cfg, args.address, STAGES[args.command], getattr(args, "checkpoint", None), getattr(args, "resume", None)
    )
    print_summary(args.command, cfg, out)
    return 0


def check_inputs(args: argparse.Namespace, cfg: RaylmConfig) -> None:
    """What a stage reads, checked here in about a second rather than in a Ray worker."""
    finetune = args.command == "finetune"
    if finetune and not cfg.finetune.base:
        raise ConfigError("finetune.base: give the model to start from (--base PATH or finetune.base in the config)")
    from raylm.pipelines.data.readers import check_sources  # pyarrow only: no Ray yet

    if "prepare" in STAGES[args.command] or (finetune and cfg.finetune.mode == "cpt"):
        check_sources(cfg.data.sources)
    if finetune and cfg.finetune.mode == "sft":
        check_sources(cfg.finetune.sft.sources, "finetune.sft.sources")
    if finetune:
        check_base(Path(cfg.finetune.base))
    if getattr(args, "checkpoint", None):  # evaluate --checkpoint: refused here, not in a Ray actor
        model_dir(args.checkpoint, "--checkpoint")
    from raylm.pipelines.eval.tasks import check_tasks  # pyyaml and pydantic only

    e = cfg.eval
    if "evaluate" in STAGES[args.command]:
        check_tasks(e.tasks, e.task_data_dir, "eval.tasks")
    if {"pretrain", "finetune"} & set(STAGES[args.command]):
        check_tasks(e.during_training.tasks, e.task_data_dir, "eval.during_training.tasks")


def check_base(path: Path) -> None:
    if not ((path / "model.json").is_file() or (path / "config.json").is_file()):
        raise DataError(
            f"finetune.base: {path} is neither a raylm model directory (model.json) "
            "nor a Hugging Face one (config.json)"
        )


def print_summary(command: str, cfg: RaylmConfig, out) -> None:
    lines = [
        f"raylm {command} '{cfg.run.name}' finished in {out.seconds['total']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in out.seconds.items() if k != 'total')})"
    ]
    if out.manifest:
        lines.append(_data_line(out.manifest))
    if out.checkpoint:
        lines.append(f"  checkpoint  {out.checkpoint}")
    lines += _score_lines(out)
    if out.sample is not None:
        lines.append(f"  sample      {out.sample[:200]!r}")
    lines += _mlflow_lines(cfg, out.tracker)
    print("\n".join(lines))


def _data_line(manifest: Manifest) -> str:
    tr = manifest.splits["train"]
    examples = "" if tr.examples is None else f"{tr.examples:,} examples, {tr.trained_tokens:,} trained tokens, "
    return f"  data        {manifest.path} ({examples}{tr.tokens:,} train tokens, vocab {manifest.vocab_size})"


def _score_lines(out) -> list[str]:
    """Validation (with the baselines to read it against), text files and tasks."""
    lines = []
    if out.metrics:
        m = out.metrics
        lines.append(
            f"  validation  loss {m['final_val_loss']:.4f} nats/token | perplexity {m['final_val_perplexity']:.2f} | "
            f"{m['final_val_bits_per_byte']:.4f} bits/byte ({_scored(m)})"
        )
        if out.manifest.unigram_baseline is not None:
            lines.append(f"  baselines   {_baselines(out.manifest)}")
    for name, m in out.texts.items():
        lines.append(
            f"  text        {name}: loss {m['loss']:.4f} nats/token | perplexity {m['perplexity']:.2f} | "
            f"{m['bits_per_byte']:.4f} bits/byte ({m['windows']} windows)"
        )
    for task, scores in out.tasks.items():
        shown = " | ".join(f"{k} {v:.4f}" if k != "examples" else f"{v:.0f} examples" for k, v in scores.items())
        lines.append(f"  task        {task}: {shown}")
    return lines


def _scored(m: dict) -> str:
    """How much of the validation split the scores cover (eval.max_tokens bounds it)."""
    windows, split = int(m["final_val_windows"]), int(m["final_val_split_windows"])
    share = "the whole split" if windows == split else "eval.max_tokens; null scores all"
    return f"{windows:,} of {split:,} windows, {int(m['final_val_tokens']):,} tokens: {share}"


def _baselines(manifest: Manifest) -> str:
    text = f"unigram model {manifest.unigram_baseline.bits_per_byte:.4f} bits/byte"
    if manifest.reference is not None:
        ref = manifest.reference
        text += f"; {ref.name} {ref.bits_per_byte:.4f} bits/byte (no model can beat it)"
    return text


def _mlflow_lines(cfg: RaylmConfig, t) -> list[str]:
    """The run, and how to open it in the MLflow UI: a command for a local store, a link for a server."""
    lines = [f"  MLflow      run {t.run_id} in experiment '{cfg.tracking.experiment}' at {redact(t.uri)}"]
    if t.uri.startswith(("sqlite:", "file:", "/")):
        lines.append(
            f"  MLflow UI   mlflow ui --backend-store-uri {redact(t.uri)} --host 127.0.0.1 --port 5000"
            f"  then open http://127.0.0.1:5000/#/experiments/{t.experiment_id}/runs/{t.run_id}"
        )
    elif t.uri.startswith(("http:", "https:")):
        lines.append(f"  MLflow UI   {redact(t.uri).rstrip('/')}/#/experiments/{t.experiment_id}/runs/{t.run_id}")
    return lines


COMMANDS = [
    Command(
        "run",
        "the whole lifecycle: prepare -> pretrain -> evaluate, in one MLflow run",
        stage_args(data_args, eval_args, resume_args),
        cmd_stages,
    ),
    Command(
        "prepare",
        "clean the corpus, train the BPE tokenizer, pack token windows (Ray Data)",
        stage_args(data_args),
        cmd_stages,
    ),
    Command(
        "pretrain",
        "train the model on prepared data (Ray Train workers, DDP or FSDP2)",
        stage_args(data_args, resume_args),
        cmd_stages,
    ),
    Command(
        "evaluate",
        "score a checkpoint on the validation split (Ray Data batch inference) and sample",
        stage_args(data_args, follow_args, eval_args),
        cmd_stages,
    ),
    Command(
        "finetune",
        "continued pretraining, instruction SFT or LoRA from a checkpoint or HF model, then evaluate",
        stage_args(finetune_args, data_args, eval_args, resume_args),
        cmd_stages,
    ),
]
