"""The `raylm` command line. Heavy imports (Ray, torch) wait until the config has validated,
so a bad config fails in about a second, before any worker starts."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from raylm.cluster.commands import add_cluster_commands, add_submit_command
from raylm.config import RaylmConfig, load_config, load_raw, validate
from raylm.errors import ConfigError, DataError, Interrupted, RaylmError
from raylm.fmt import redact
from raylm.pipelines.runtime import check_tracking_uri

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
    "cluster": "KubeRay manifests for a config: render, validate, apply, status, logs, delete (cluster/README.md)",
    "tune": "search architecture and hyperparameters with Ray Tune (trials are pretrain jobs); one MLflow run per sweep",
    "cost": "estimate a run before launch: FLOPs, time to train and dollars on a few cluster sizes (no Ray)",
    "runs": "list the MLflow runs, newest first, or compare a few side by side: no MLflow UI needed (no Ray)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="Train language models end to end on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        _config_args(p)
        p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local instance)")
        if name in ("run", "prepare"):
            p.add_argument(
                "--data",
                action="append",
                metavar="PATH",
                help="file, directory, glob or URI to train on; each --data is one source (replaces data.sources)",
            )
        if name == "evaluate":
            p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the run's latest)")
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
        if name == "finetune":
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
        if name in ("run", "evaluate", "finetune"):
            p.add_argument(
                "--task",
                action="append",
                metavar="YAML",
                help="also score a task (configs/tasks/*.yaml); repeatable (replaces eval.tasks)",
            )
            p.add_argument(
                "--data-dir", metavar="DIR", help="the folder task files' paths are under (eval.task_data_dir)"
            )
            p.add_argument("--limit", type=int, metavar="N", help="score the first N examples of each task")
            p.add_argument(
                "--text",
                action="append",
                metavar="FILE",
                help="also score loss, perplexity and bits per byte on a text file (repeatable; eval.texts)",
            )
        if name in ("run", "pretrain", "finetune"):
            p.add_argument(
                "--resume",
                type=Path,
                metavar="PATH",
                help="start from this checkpoint directory (a run's own checkpoints, if any, win)",
            )
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
    g.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="text to continue; repeat for a batch (default: start a new document)",
    )
    g.add_argument("--max-new-tokens", type=int, default=200, help="at most this many (and within the model's context)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the most likely tokens up to this mass")
    g.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TOKEN",
        help="also stop at this one-token string (repeatable; EOS always stops)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)
    e = sub.add_parser("export-hf", help=HELP["export-hf"], description=HELP["export-hf"])
    _config_args(e)
    e.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the config's run's latest)")
    e.add_argument("--out", type=Path, required=True, help="directory to write")
    e.set_defaults(func=cmd_export_hf)
    t = sub.add_parser("tune", help=HELP["tune"], description=HELP["tune"])
    _config_args(t)
    t.add_argument(
        "--space", required=True, metavar="YAML", help="the sweep file: search space, algorithm, scheduler, budgets"
    )
    t.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local instance)")
    t.add_argument(
        "--resume",
        nargs="?",
        const=True,
        type=_auto_only,
        metavar="auto",
        help="continue the interrupted sweep of this run.name; finished trials are kept. "
        "--resume auto: continue it if there is one, else start (what a cluster job's retry needs)",
    )
    t.set_defaults(func=cmd_tune)
    k = sub.add_parser("cluster", help=HELP["cluster"], description=HELP["cluster"])
    add_cluster_commands(k, _config_args)
    i = sub.add_parser("import-hf", help=HELP["import-hf"], description=HELP["import-hf"])
    i.add_argument("source", type=Path, help="directory with config.json and model.safetensors (or shards)")
    i.add_argument("--out", type=Path, required=True, help="raylm model directory to write")
    i.set_defaults(func=cmd_import_hf)
    c = sub.add_parser("cost", help=HELP["cost"], description=HELP["cost"])
    _config_args(c)
    c.add_argument(
        "--gpu", help="GPU type, priced and peaked in pipelines/train/cost.py (default: cluster.gpu.type, H100)"
    )
    c.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="GPUs of the run (default: scaling.num_workers if scaling.use_gpu, else 8)",
    )
    c.add_argument(
        "--mfu", type=float, default=None, metavar="F", help="expected model FLOPs utilization (default 0.40)"
    )
    c.add_argument("--spot", action="store_true", help="price at the spot column (default: cluster.gpu.spot)")
    c.add_argument("--price", type=float, metavar="USD", help="USD per GPU-hour, over every table and the config")
    c.add_argument("--prices", metavar="YAML", help="a price file over the table: {H100: {on_demand: 2.49, spot: 1.8}}")
    c.set_defaults(func=cmd_cost)
    _runs_parser(sub)
    add_submit_command(sub)
    return parser


def _runs_parser(sub) -> None:
    r = sub.add_parser("runs", help=HELP["runs"], description=HELP["runs"])
    _config_args(r)  # the config gives tracking.tracking_uri and tracking.experiment, nothing else
    r.add_argument(
        "--compare",
        nargs="+",
        metavar="RUN",
        help="these runs side by side, with the params that differ (RUN: an MLflow run name, the newest "
        "of that name, or a run id prefix)",
    )
    r.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="the MLflow store (default: tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    r.add_argument("--experiment", metavar="NAME", help="default: tracking.experiment (raylm)")
    r.add_argument(
        "--stage",
        metavar="S",
        help="only runs of this stage: run, prepare, pretrain, evaluate, finetune, tune, trial or lm-eval",
    )
    r.add_argument(
        "--status",
        type=str.upper,
        choices=["RUNNING", "FINISHED", "FAILED", "KILLED"],
        help="only runs in this state (the table says RUNNING? for a run silent for 10 minutes: "
        "its driver may be gone)",
    )
    r.add_argument("--name", metavar="TEXT", help="only runs whose name contains TEXT (any case)")
    r.add_argument("--limit", type=int, default=20, metavar="N", help="at most N runs (default 20)")
    r.add_argument(
        "--sort",
        choices=["start", "cost", "tokens", "best_val_loss"],
        default="start",
        help="start: the newest first (default); cost, tokens: the largest first; best_val_loss: the "
        "lowest first (reads every matching run: ~15 s for 1000 from sqlite)",
    )
    r.add_argument("--json", action="store_true", help="print a JSON list of the rows instead of a table")
    r.set_defaults(func=cmd_runs)


def _auto_only(value: str) -> str:
    if value != "auto":
        raise argparse.ArgumentTypeError(f"takes no value, or 'auto' (got {value!r}; put the config before --resume)")
    return value


def _config_args(p: argparse.ArgumentParser) -> None:
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


def cmd_stages(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.command == "finetune" and not cfg.finetune.base:
        raise ConfigError("finetune.base: give the model to start from (--base PATH or finetune.base in the config)")
    from raylm.pipelines.data.readers import check_sources  # pyarrow only: no Ray yet

    if "prepare" in STAGES[args.command] or (args.command == "finetune" and cfg.finetune.mode == "cpt"):
        check_sources(cfg.data.sources)
    if args.command == "finetune" and cfg.finetune.mode == "sft":
        check_sources(cfg.finetune.sft.sources, "finetune.sft.sources")
    if args.command == "finetune":
        _check_base(Path(cfg.finetune.base))
    if getattr(args, "checkpoint", None):  # evaluate --checkpoint: refused here, not in a Ray actor
        _model_dir(args.checkpoint, "--checkpoint")
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


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    from raylm.pipelines.eval.sampling import sample_texts
    from raylm.pipelines.jobs import find_checkpoint

    checkpoint = _model_dir(args.checkpoint or find_checkpoint(cfg), "--checkpoint")
    texts = sample_texts(
        checkpoint,
        args.prompt or [""],
        args.max_new_tokens,
        args.temperature,
        args.top_k or None,
        args.top_p,
        tuple(args.stop),
        args.seed,
    )
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
    print(f"  MLflow      run {tracker.run_id} in experiment '{cfg.tracking.experiment}' at {redact(tracker.uri)}")
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


def cmd_cost(args: argparse.Namespace) -> int:
    from functools import partial

    from raylm.models.config import flops_per_token
    from raylm.pipelines.train.cost import EXPECTED_MFU, PEAK_FLOPS, estimate, gpu_name, planned_model, planned_tokens

    cfg = resolve_config(args)  # pydantic, yaml and the model's arithmetic: no Ray, no torch
    gpu, mfu = gpu_name(args.gpu or cfg.cluster.gpu.type), EXPECTED_MFU if args.mfu is None else args.mfu
    args.spot = args.spot or cfg.cluster.gpu.spot  # what `raylm cluster render` would schedule on
    gpus = args.gpus if args.gpus is not None else cfg.scaling.num_workers if cfg.scaling.use_gpu else 8
    if gpus < 1 or not 0 < mfu <= 1 or (args.price is not None and args.price < 0):
        raise ConfigError("cost: --gpus must be >= 1, --mfu in (0, 1] and --price >= 0")
    model = planned_model(cfg.model, cfg.tokenizer.vocab_size)
    fpt, tokens = flops_per_token(model, cfg.data.seq_len), planned_tokens(cfg.train, cfg.data.seq_len)
    price, source = _cost_price(args, cfg, gpu)
    plan = partial(estimate, fpt, tokens, PEAK_FLOPS[gpu], mfu=mfu, price_per_hour=price)  # plan(gpus)
    lines = [
        f"raylm cost '{cfg.run.name}': an estimate before launch",
        *_cost_work(cfg, model, fpt, tokens),
        f"  assumes      {PEAK_FLOPS[gpu] / 1e12:,.0f} TFLOP/s dense bf16 peak per {gpu} at {mfu:.0%} MFU; "
        f"${price:,.2f} per GPU-hour ({source})",
    ]
    mine = plan(gpus)
    lines.append(
        f"  estimate     {gpus} x {gpu}: {mine.tokens_per_s:,.0f} tokens/s, {_duration(mine.hours)} to train, "
        f"{_gpu_hours(mine.unit_hours)} GPU-hours, {_dollars(mine.usd)}"
    )
    if cfg.train.max_usd:
        share = mine.usd / cfg.train.max_usd
        lines.append(f"  budget       train.max_usd {_dollars(cfg.train.max_usd)}: the estimate is {share:.1%} of it")
    print("\n".join(lines + [""] + _cost_table(plan, gpus, cfg.train.batch_size)))
    return 0


def _cost_price(args: argparse.Namespace, cfg: RaylmConfig, gpu: str) -> tuple[float, str]:
    """--price wins; --spot or --prices ask for the table's column; else scaling.price_per_hour
    if set, else the table's on-demand column: what training would charge."""
    from raylm.pipelines.train.cost import PRICES, load_prices, quote

    if args.price is not None:
        return args.price, "--price"
    if cfg.scaling.price_per_hour is not None and not (args.spot or args.prices):
        return cfg.scaling.price_per_hour, "scaling.price_per_hour"
    usd, source = quote(gpu, args.spot, load_prices(args.prices) if args.prices else PRICES)
    return usd, f"{'spot' if args.spot else 'on-demand'}: {source}"


def _cost_work(cfg: RaylmConfig, model, fpt: int, tokens: int) -> list[str]:
    """The run's size, each figure with what it is made of, to check by hand."""
    from raylm.models.config import param_counts

    counts, seq_len = param_counts(model), cfg.data.seq_len
    matmul = counts["non_embedding"] + model.vocab_size * model.n_embd  # flops_per_token's N: the output head counts
    vocab = (
        "model.vocab_size"
        if cfg.model.vocab_size
        else f"tokenizer.vocab_size {cfg.tokenizer.vocab_size:,} padded to 64"
    )
    steps = tokens // (cfg.train.batch_size * seq_len)
    capped = " (train.max_tokens ends it before max_steps)" if steps < cfg.train.max_steps else ""
    return [
        f"  model        {counts['total']:,} parameters ({counts['non_embedding']:,} non-embedding; "
        f"vocab {model.vocab_size:,} = {vocab})",
        f"  FLOPs/token  {fpt:,} = 6 x {matmul:,} matmul weights + {fpt - 6 * matmul:,} attention "
        f"at seq_len {seq_len:,}",
        f"  tokens       {tokens:,} = {steps:,} steps x {cfg.train.batch_size:,} sequences x {seq_len:,} tokens{capped}",
        f"  compute      {fpt * tokens:.4g} FLOPs",
    ]


def _cost_table(plan, gpus: int, batch_size: int) -> list[str]:
    """Time to train and cost at a few sizes, with each GPU's share of the global batch (data
    parallelism needs at least one sequence per GPU, so larger sizes are left out)."""
    rows = [f"  {'GPUs':>5} {'seqs/GPU':>9} {'tokens/s':>14} {'time to train':>14} {'GPU-hours':>10} {'cost':>12}"]
    for n in sorted({n for n in (1, 8, 64, 512) if n <= batch_size} | {gpus}):
        e = plan(n)
        rows.append(
            f"  {n:>5} {batch_size / n:>9.4g} {e.tokens_per_s:>14,.0f} {_duration(e.hours):>14} "
            f"{_gpu_hours(e.unit_hours):>10} {_dollars(e.usd):>12}" + ("  <- this run" if n == gpus else "")
        )
    return rows + [
        "  Constant MFU, i.e. linear scaling: GPU-hours and cost are the same at every size. In practice",
        "  MFU drops as GPUs are added (communication, fewer sequences per GPU), so large sizes take",
        "  longer and cost more than shown; measure a few hundred steps at the size you mean to use.",
    ]


def _duration(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:,.1f} days"
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{hours * 60:.1f} min" if hours >= 1 / 60 else f"{hours * 3600:.3g} s"


def _gpu_hours(hours: float) -> str:
    return f"{hours:,.2f}" if hours >= 0.01 else f"{hours:.2g}"


def _dollars(usd: float) -> str:
    return f"${usd:,.2f}" if usd >= 0.01 else f"${usd:.5f}"  # a CPU-sized run costs fractions of a cent


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


def _check_base(path: Path) -> None:
    if not ((path / "model.json").is_file() or (path / "config.json").is_file()):
        raise DataError(
            f"finetune.base: {path} is neither a raylm model directory (model.json) "
            "nor a Hugging Face one (config.json)"
        )


def _model_dir(path: Path, flag: str) -> Path:
    from raylm.models.io import check_safetensors  # safetensors and torch: after the config has validated

    if not (path / "model.safetensors").is_file():
        raise RaylmError(f"{flag}: {path} holds no model.safetensors")
    check_safetensors(path / "model.safetensors")
    return path


def print_summary(command: str, cfg: RaylmConfig, out) -> None:
    t = out.tracker
    lines = [
        f"raylm {command} '{cfg.run.name}' finished in {out.seconds['total']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in out.seconds.items() if k != 'total')})"
    ]
    if out.manifest:
        tr = out.manifest["splits"]["train"]
        examples = f"{tr['examples']:,} examples, {tr['trained_tokens']:,} trained tokens, " if "examples" in tr else ""
        lines.append(
            f"  data        {out.manifest['path']} ({examples}{tr['tokens']:,} train tokens, vocab {out.manifest['vocab_size']})"
        )
    if out.checkpoint:
        lines.append(f"  checkpoint  {out.checkpoint}")
    if out.metrics:
        m = out.metrics
        lines.append(
            f"  validation  loss {m['final_val_loss']:.4f} nats/token | perplexity {m['final_val_perplexity']:.2f} | "
            f"{m['final_val_bits_per_byte']:.4f} bits/byte"
        )
        if "unigram_baseline" in out.manifest:
            lines.append(f"  baselines   {_baselines(out.manifest)}")
    for name, m in out.texts.items():
        lines.append(
            f"  text        {name}: loss {m['loss']:.4f} nats/token | perplexity {m['perplexity']:.2f} | "
            f"{m['bits_per_byte']:.4f} bits/byte ({m['windows']} windows)"
        )
    for task, scores in out.tasks.items():
        shown = " | ".join(f"{k} {v:.4f}" if k != "examples" else f"{v:.0f} examples" for k, v in scores.items())
        lines.append(f"  task        {task}: {shown}")
    if out.sample is not None:
        lines.append(f"  sample      {out.sample[:200]!r}")
    lines.append(f"  MLflow      run {t.run_id} in experiment '{cfg.tracking.experiment}' at {redact(t.uri)}")
    if t.uri.startswith(("sqlite:", "file:", "/")):
        lines.append(
            f"  MLflow UI   mlflow ui --backend-store-uri {redact(t.uri)} --host 127.0.0.1 --port 5000"
            f"  then open http://127.0.0.1:5000/#/experiments/{t.experiment_id}/runs/{t.run_id}"
        )
    elif t.uri.startswith(("http:", "https:")):
        lines.append(f"  MLflow UI   {redact(t.uri).rstrip('/')}/#/experiments/{t.experiment_id}/runs/{t.run_id}")
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
