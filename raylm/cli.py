"""The `raylm` command line. Heavy imports (Ray, torch) wait until the config has validated,
so a bad config fails in about a second, before any worker starts."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from raylm.pipelines.config import RaylmConfig, load_config, load_raw, validate
from raylm.pipelines.errors import ConfigError, DataError, Interrupted, RaylmError

STAGES = {
    "run": ("prepare", "pretrain", "evaluate"),
    "prepare": ("prepare",),
    "pretrain": ("pretrain",),
    "evaluate": ("evaluate",),
    "finetune": ("finetune", "evaluate"),
}
HELP = {
    "run": "the whole lifecycle: prepare -> pretrain -> evaluate, in one MLflow run",
    "prepare": "clean the corpus, train the BPE tokenizer, pack token windows (Ray Data)",
    "pretrain": "train the model on prepared data (Ray Train workers, DDP or FSDP2)",
    "evaluate": "score a checkpoint on the validation split (Ray Data batch inference) and sample",
    "finetune": "continued pretraining, instruction SFT or LoRA from a checkpoint or HF model, then evaluate",
    "lm-eval": "run lm-evaluation-harness tasks on a checkpoint (needs the lm-eval extra); results to MLflow",
    "generate": "print text sampled from a checkpoint (runs in-process)",
    "export-hf": "write a checkpoint as a Hugging Face LlamaForCausalLM directory (with its tokenizer)",
    "import-hf": "turn a Hugging Face Llama-architecture directory (safetensors) into a raylm model directory",
    "tune": "search architecture and hyperparameters with Ray Tune (trials are pretrain jobs); one MLflow run per sweep",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="Train language models end to end on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        _config_args(p)
        p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local instance)")
        if name in ("run", "prepare"):
            p.add_argument("--data", action="append", metavar="PATH",
                           help="file, directory, glob or URI to train on; each --data is one source (replaces data.sources)")
        if name == "evaluate":
            p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the run's latest)")
            p.add_argument("--follow", action="store_true",
                           help="score each new checkpoint of the run as training writes it, until the last step")
            p.add_argument("--idle-minutes", type=float, default=30.0, metavar="M",
                           help="with --follow: stop after M minutes without a new checkpoint (default 30)")
        if name == "finetune":
            p.add_argument("--base", metavar="PATH",
                           help="checkpoint, raylm model directory or Hugging Face Llama directory (finetune.base)")
            p.add_argument("--sft", action="append", metavar="JSONL",
                           help="instruction data; each --sft is one source, format detected (replaces finetune.sft.sources)")
            p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight (finetune.lora.enabled)")
        if name in ("run", "evaluate", "finetune"):
            p.add_argument("--task", action="append", metavar="YAML",
                           help="also score a task (configs/tasks/*.yaml); repeatable (replaces eval.tasks)")
            p.add_argument("--data-dir", metavar="DIR", help="the folder task files' paths are under (eval.task_data_dir)")
            p.add_argument("--limit", type=int, metavar="N", help="score the first N examples of each task")
            p.add_argument("--text", action="append", metavar="FILE",
                           help="also score loss, perplexity and bits per byte on a text file (repeatable; eval.texts)")
        if name in ("run", "pretrain", "finetune"):
            p.add_argument("--resume", type=Path, metavar="PATH",
                           help="start from this checkpoint directory (a run's own checkpoints, if any, win)")
        p.set_defaults(func=cmd_stages)
    le = sub.add_parser("lm-eval", help=HELP["lm-eval"], description=HELP["lm-eval"])
    _config_args(le)
    le.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the config's run's latest)")
    le.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    le.add_argument("--include-path", metavar="DIR", help="a folder of extra lm-eval task YAMLs, e.g. configs/lm_eval")
    le.add_argument("--limit", type=int, metavar="N", help="the first N examples of each task")
    le.add_argument("--num-fewshot", type=int, metavar="K", help="k-shot (default: each task's own)")
    le.set_defaults(func=cmd_lm_eval)
    g = sub.add_parser("generate", help=HELP["generate"], description=HELP["generate"])
    _config_args(g)
    g.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the config's run's latest)")
    g.add_argument("--prompt", action="append", metavar="TEXT",
                   help="text to continue; repeat for a batch (default: start a new document)")
    g.add_argument("--max-new-tokens", type=int, default=200, help="at most this many (and within the model's context)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the most likely tokens up to this mass")
    g.add_argument("--stop", action="append", default=[], metavar="TOKEN",
                   help="also stop at this one-token string (repeatable; EOS always stops)")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)
    e = sub.add_parser("export-hf", help=HELP["export-hf"], description=HELP["export-hf"])
    _config_args(e)
    e.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the config's run's latest)")
    e.add_argument("--out", type=Path, required=True, help="directory to write")
    e.set_defaults(func=cmd_export_hf)
    t = sub.add_parser("tune", help=HELP["tune"], description=HELP["tune"])
    _config_args(t)
    t.add_argument("--space", required=True, metavar="YAML", help="the sweep file: search space, algorithm, scheduler, budgets")
    t.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local instance)")
    t.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this run.name; finished trials are kept")
    t.set_defaults(func=cmd_tune)
    i = sub.add_parser("import-hf", help=HELP["import-hf"], description=HELP["import-hf"])
    i.add_argument("source", type=Path, help="directory with config.json and model.safetensors (or shards)")
    i.add_argument("--out", type=Path, required=True, help="raylm model directory to write")
    i.set_defaults(func=cmd_import_hf)
    return parser


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (default: built-in quickstart defaults)")
    p.add_argument("--config", dest="config_flag", metavar="CONFIG", help="same as the positional CONFIG")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted path, e.g. --set train.lr=3e-4 (repeatable)")


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
    overrides = [f"{key}={json.dumps(value(getattr(args, flag)))}" for flag, key, value in FLAG_KEYS if getattr(args, flag, None)]
    return args.config or args.config_flag, overrides + list(args.overrides)


def cmd_tune(args: argparse.Namespace) -> int:
    from raylm.tuning.space import load_sweep  # pydantic and yaml only: no Ray yet

    path, overrides = config_source(args)
    raw = load_raw(path, overrides)
    validate(raw, str(path or "defaults"))
    spec = load_sweep(args.space, raw)
    from raylm.tuning.report import print_result
    from raylm.tuning.sweep import run_sweep  # imports Ray and torch

    out = run_sweep(raw, spec, Path(args.space).read_text(), args.address, args.resume)
    print_result(out, spec.metric)
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.command == "finetune" and not cfg.finetune.base:
        raise ConfigError("finetune.base: give the model to start from (--base PATH or finetune.base in the config)")
    from raylm.pipelines.readers import check_sources  # pyarrow only: no Ray yet

    if "prepare" in STAGES[args.command] or (args.command == "finetune" and cfg.finetune.mode == "cpt"):
        check_sources(cfg.data.sources)
    if args.command == "finetune" and cfg.finetune.mode == "sft":
        check_sources(cfg.finetune.sft.sources, "finetune.sft.sources")
    if args.command == "finetune":
        _check_base(Path(cfg.finetune.base))
    if getattr(args, "follow", False):
        from raylm.pipelines.jobs import follow_run

        tracker = follow_run(cfg, args.address, args.idle_minutes)
        print(f"  MLflow      run {tracker.run_id} in experiment '{cfg.tracking.experiment}' at {tracker.uri}")
        return 0
    from raylm.pipelines.jobs import run_lifecycle  # imports Ray and torch

    out = run_lifecycle(cfg, args.address, STAGES[args.command], getattr(args, "checkpoint", None),
                        getattr(args, "resume", None))
    print_summary(args.command, cfg, out)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    from raylm.pipelines.jobs import find_checkpoint
    from raylm.pipelines.sampling import sample_texts

    checkpoint = _model_dir(args.checkpoint or find_checkpoint(cfg), "--checkpoint")
    texts = sample_texts(checkpoint, args.prompt or [""], args.max_new_tokens, args.temperature, args.top_k or None,
                         args.top_p, tuple(args.stop), args.seed)
    print("\n\n".join(texts))
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if importlib.util.find_spec("lm_eval") is None:
        raise RaylmError("lm-eval is not installed: pip install 'raylm[lm-eval]'")
    from raylm.pipelines.jobs import find_checkpoint, lm_eval_job

    checkpoint = _model_dir(args.checkpoint or find_checkpoint(cfg), "--checkpoint")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    scores, tracker = lm_eval_job(cfg, checkpoint, tasks, args.include_path, args.limit, args.num_fewshot)
    for task, metrics in scores.items():
        print(f"  lm-eval     {task}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"  MLflow      run {tracker.run_id} in experiment '{cfg.tracking.experiment}' at {tracker.uri}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    from raylm.models.hf import NotConvertible, export_hf
    from raylm.pipelines.jobs import find_checkpoint

    checkpoint = _model_dir(args.checkpoint or find_checkpoint(cfg), "--checkpoint")
    try:
        out = export_hf(checkpoint, args.out)
    except NotConvertible as err:
        raise RaylmError(str(err)) from None
    print(f"exported {checkpoint} -> {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from raylm.models import param_counts
    from raylm.models.hf import NotConvertible, import_hf

    if not (args.source / "config.json").is_file():
        raise RaylmError(f"{args.source}: no config.json (expected a Hugging Face model directory)")
    try:
        model = import_hf(args.source, args.out)
    except NotConvertible as err:
        raise RaylmError(str(err)) from None
    print(f"imported {args.source} -> {args.out} ({param_counts(model.config)['total']:,} parameters)")
    return 0


def _check_base(path: Path) -> None:
    if not ((path / "model.json").is_file() or (path / "config.json").is_file()):
        raise DataError(f"finetune.base: {path} is neither a raylm model directory (model.json) "
                        "nor a Hugging Face one (config.json)")


def _model_dir(path: Path, flag: str) -> Path:
    if not (path / "model.safetensors").is_file():
        raise RaylmError(f"{flag}: {path} holds no model.safetensors")
    return path


def print_summary(command: str, cfg: RaylmConfig, out) -> None:
    t = out.tracker
    lines = [f"raylm {command} '{cfg.run.name}' finished in {out.seconds['total']:.0f} s "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in out.seconds.items() if k != 'total')})"]
    if out.manifest:
        tr = out.manifest["splits"]["train"]
        examples = f"{tr['examples']:,} examples, {tr['trained_tokens']:,} trained tokens, " if "examples" in tr else ""
        lines.append(f"  data        {out.manifest['path']} ({examples}{tr['tokens']:,} train tokens, vocab {out.manifest['vocab_size']})")
    if out.checkpoint:
        lines.append(f"  checkpoint  {out.checkpoint}")
    if out.metrics:
        m = out.metrics
        lines.append(f"  validation  loss {m['final_val_loss']:.4f} nats/token | perplexity {m['final_val_perplexity']:.2f} | "
                     f"{m['final_val_bits_per_byte']:.4f} bits/byte")
        if "unigram_baseline" in out.manifest:
            lines.append(f"  baselines   {_baselines(out.manifest)}")
    for name, m in out.texts.items():
        lines.append(f"  text        {name}: loss {m['loss']:.4f} nats/token | perplexity {m['perplexity']:.2f} | "
                     f"{m['bits_per_byte']:.4f} bits/byte ({m['windows']} windows)")
    for task, scores in out.tasks.items():
        shown = " | ".join(f"{k} {v:.4f}" if k != "examples" else f"{v:.0f} examples" for k, v in scores.items())
        lines.append(f"  task        {task}: {shown}")
    if out.sample is not None:
        lines.append(f"  sample      {out.sample[:200]!r}")
    lines.append(f"  MLflow      run {t.run_id} in experiment '{cfg.tracking.experiment}' at {t.uri}")
    if t.uri.startswith(("sqlite:", "file:", "/")):
        lines.append(f"  MLflow UI   mlflow ui --backend-store-uri {t.uri} --host 127.0.0.1 --port 5000"
                     f"  then open http://127.0.0.1:5000/#/experiments/{t.experiment_id}/runs/{t.run_id}")
    print("\n".join(lines))


def _baselines(manifest: dict) -> str:
    text = f"unigram model {manifest['unigram_baseline']['bits_per_byte']:.4f} bits/byte"
    if manifest.get("reference"):
        text += f"; {manifest['reference']['name']} {manifest['reference']['bits_per_byte']:.4f} bits/byte (no model can beat it)"
    return text


def main(argv: list[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
