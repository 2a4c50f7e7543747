"""`raylm generate|export-hf|import-hf|lm-eval`: what a trained model does outside the lifecycle.
They run in-process; torch (and lm-eval, transformers' formats) load after the config validated."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from raylm.cli.common import Command, config_args, model_dir, resolve_config
from raylm.errors import RaylmError
from raylm.fmt import redact


def checkpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="checkpoint directory or s3:// gs:// URI (default: the config's run's latest)")


def lm_eval_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    checkpoint_arg(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", metavar="DIR", help="a folder of extra lm-eval task YAMLs, e.g. configs/lm_eval")
    p.add_argument("--limit", type=int, metavar="N", help="the first N examples of each task")
    p.add_argument("--num-fewshot", type=int, metavar="K", help="k-shot (default: each task's own)")


def generate_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    checkpoint_arg(p)
    p.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="text to continue; repeat for a batch (default: start a new document)",
    )
    p.add_argument("--max-new-tokens", type=int, default=200, help="at most this many (and within the model's context)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the most likely tokens up to this mass")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TOKEN",
        help="also stop at this one-token string (repeatable; EOS always stops)",
    )
    p.add_argument("--seed", type=int, default=0)


def export_hf_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    checkpoint_arg(p)
    p.add_argument("--out", type=Path, required=True, help="directory to write")


def import_hf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help="directory with config.json and model.safetensors (or shards)")
    p.add_argument("--out", type=Path, required=True, help="raylm model directory to write")


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    from raylm.pipelines.eval.sampling import sample_texts
    from raylm.pipelines.jobs import find_checkpoint

    checkpoint = model_dir(args.checkpoint or find_checkpoint(cfg), "--checkpoint")
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

    checkpoint = model_dir(args.checkpoint or find_checkpoint(cfg), "--checkpoint")
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

    checkpoint = model_dir(args.checkpoint or find_checkpoint(cfg), "--checkpoint")
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


LM_EVAL = Command(
    "lm-eval",
    "run lm-evaluation-harness tasks on a checkpoint (needs the lm-eval extra); results to MLflow",
    lm_eval_args,
    cmd_lm_eval,
)
GENERATE = Command("generate", "print text sampled from a checkpoint (runs in-process)", generate_args, cmd_generate)
EXPORT_HF = Command(
    "export-hf",
    "write a checkpoint as a Hugging Face LlamaForCausalLM directory (with its tokenizer)",
    export_hf_args,
    cmd_export_hf,
)
IMPORT_HF = Command(
    "import-hf",
    "turn a Hugging Face Llama-architecture directory (safetensors) into a raylm model directory",
    import_hf_args,
    cmd_import_hf,
)
