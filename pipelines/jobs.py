"""The jobs behind the CLI: each takes the whole config, hands every component only its own
section, and records what happened in one MLflow run."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raylm.config import RaylmConfig, section_fingerprint
from raylm.errors import DataError, Interrupted
from raylm.fmt import redact
from raylm.models import GPT, flops_per_token, param_counts
from raylm.models.lora import apply_lora, trainable_counts
from raylm.pipelines.data.manifest import Manifest
from raylm.pipelines.data.prepare import find_prepared, prepare
from raylm.pipelines.eval.evaluate import evaluate, evaluate_text, headline, plan_replicas, score_tasks, table_name
from raylm.pipelines.eval.sampling import sample_text
from raylm.pipelines.runtime import size_pools_for, start_ray, tracking_uri
from raylm.pipelines.track.provenance import data_label, provenance_tags, run_title
from raylm.pipelines.track.review import log_loss_curve, log_model
from raylm.pipelines.track.tracking import Tracker, deliver_pending
from raylm.pipelines.train.checkpoint import latest_checkpoint, step_of, whole_checkpoints
from raylm.pipelines.train.finetune import (
    check_fits,
    finetune_windows,
    load_base_config,
    lora_config,
    merge_on_a_worker,
    resolve_base,
)
from raylm.pipelines.train.follow import cpus_beside_training, during_training, unless_removed
from raylm.pipelines.train.pretrain import build_model_config, pretrain, train_storage
from raylm.storage import Location, locate


@dataclass
class Outcome:
    """What a job produced, for the summary the CLI prints."""

    tracker: Tracker
    manifest: Manifest | None = None
    checkpoint: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    sample: str | None = None
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> its metrics
    texts: dict[str, dict[str, float]] = field(default_factory=dict)  # eval.texts file -> its scores
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, stage: str):
        started = time.perf_counter()
        yield
        self.seconds[stage] = time.perf_counter() - started


def open_tracker(cfg: RaylmConfig, stage: str) -> Tracker:
    """A new MLflow run named for what it is (pretrain-124m-tinystories-3f9c), tagged with the
    code, config and library versions, holding the config. First, what earlier runs could not
    deliver at their end (the server was out) is delivered and their final status set; then
    earlier launches of this run.name and stage that a dead driver left RUNNING are marked
    KILLED. From here on an outage of the server costs the job nothing: what it misses waits in
    <run.output_dir>/mlflow_pending/ for the next command."""
    tags = {
        "raylm.stage": stage,
        "raylm.run_name": cfg.run.name,
        "raylm.config_hash": section_fingerprint(cfg),
        "mlflow.note.content": f"`raylm {stage}` of run.name `{cfg.run.name}`; the same command resumes it.",
        **provenance_tags(),
    }
    t = cfg.tracking
    tracker = Tracker(
        tracking_uri(t.tracking_uri), t.experiment, run_title(cfg, stage), tags, system_metrics=t.system_metrics
    )
    pending, handlers = Path(cfg.run.output_dir).resolve() / "mlflow_pending", {"loss_curve": log_loss_curve}
    deliver_pending(tracker, pending, handlers)
    tracker.retire_orphans(cfg.run.name, stage)
    tracker.keep_undelivered(pending, handlers)
    tracker.log_params(cfg.flat())
    tracker.log_text(redact(cfg.to_yaml()), "config.yaml")
    return tracker


def record_data(cfg: RaylmConfig, tracker: Tracker, manifest: Manifest, stage: str) -> None:
    """Which prepared data the run used: a tag with its fingerprint and the dataset input."""
    tracker.set_tags({"raylm.data_fingerprint": Path(manifest.path).name})
    tracker.log_dataset(manifest.path, manifest.seq_len, data_label(cfg, stage), "training")


def run_lifecycle(
    cfg: RaylmConfig,
    address: str | None,
    stages: tuple[str, ...],
    checkpoint: Path | None = None,
    resume: Path | None = None,
) -> Outcome:
    """Run some of prepare -> pretrain -> evaluate in order, inside one MLflow run.
    Evaluate alone scores `checkpoint`, or else the run's latest one."""
    stage = stages[0] if len(stages) == 1 else "run"
    started = time.perf_counter()
    # Before Ray starts: missing prepared data fails in a second, not after a cluster came up.
    found = None if {"prepare", "finetune"} & set(stages) else prepared_data(cfg, stages)
    start_ray(address)
    size_pools_for(cfg.cluster)
    with open_tracker(cfg, stage) as tracker:
        out = Outcome(tracker, checkpoint=locate(checkpoint) if checkpoint else None)
        if "finetune" in stages:
            with out.timed("finetune"):
                out.manifest, out.checkpoint = do_finetune(cfg, tracker, resume)
        elif "prepare" in stages:
            with out.timed("prepare"):
                out.manifest = do_prepare(cfg, tracker)
        else:
            out.manifest = found
        if out.manifest:
            record_data(cfg, tracker, out.manifest, stage)
        if "pretrain" in stages:
            with out.timed("pretrain"):
                out.checkpoint = do_pretrain(cfg, out.manifest, tracker, resume)
        if "evaluate" in stages:
            with out.timed("evaluate"):
                out.checkpoint = out.checkpoint or find_checkpoint(cfg)
                out.metrics, out.sample = do_evaluate(cfg, out.manifest, out.checkpoint, tracker)
                out.texts = do_texts(cfg, out.checkpoint, tracker)
                out.tasks = do_tasks(cfg, out.checkpoint, tracker)
        out.seconds["total"] = time.perf_counter() - started
        tracker.log_metrics({f"{k}_seconds": v for k, v in out.seconds.items()})
    return out


def prepared_data(cfg: RaylmConfig, stages: tuple[str, ...]) -> Manifest | None:
    """This config's prepared data, which training needs; `evaluate` alone needs it only for
    the validation split (eval.validation): a checkpoint from elsewhere is scored on its tasks
    and texts with the tokenizer it carries."""
    output_dir = Path(cfg.run.output_dir).resolve()
    if stages != ("evaluate",) or cfg.eval.validation == "always":
        return find_prepared(cfg.data, cfg.tokenizer, output_dir)
    if cfg.eval.validation == "never":
        return None
    try:
        return find_prepared(cfg.data, cfg.tokenizer, output_dir)
    except DataError as err:
        print(
            f"[evaluate] no validation split to score ({err}); eval.validation=always makes this an error", flush=True
        )
        return None


def do_prepare(cfg: RaylmConfig, tracker: Tracker) -> Manifest:
    manifest = prepare(cfg.data, cfg.tokenizer, Path(cfg.run.output_dir).resolve())
    prepared = Path(manifest.path)
    tracker.log_artifact(prepared / "manifest.json", "data")
    for name in ("report.json", "report.md", "report.png"):
        tracker.log_artifact(prepared / name, "data_report")
    tracker.log_artifact(prepared / "tokenizer.json", "tokenizer")
    tracker.log_metrics(data_metrics(manifest))
    return manifest


def data_metrics(manifest: Manifest) -> dict[str, float]:
    """Per split windows and tokens; per source and stage documents and bytes out; baselines."""
    metrics = {f"data/{split}/{k}": v for split, s in manifest.splits.items() for k, v in s.metrics().items()}
    for name, source in manifest.sources.items():
        for stage in source["stages"]:
            metrics[f"data/{name}/{stage['stage']}/docs_out"] = stage["docs_out"]
            metrics[f"data/{name}/{stage['stage']}/bytes_out"] = stage["bytes_out"]
        metrics[f"data/{name}/share_of_tokens"] = source["share_achieved"]
    metrics["data/vocab_size"] = manifest.vocab_size
    baseline = manifest.unigram_baseline
    metrics.update(
        {
            "baseline_unigram_nats_per_token": baseline.nats_per_token,
            "baseline_unigram_bits_per_byte": baseline.bits_per_byte,
        }
    )
    if manifest.reference:
        metrics["baseline_optimum_bits_per_byte"] = manifest.reference.bits_per_byte
    return metrics


def do_pretrain(cfg: RaylmConfig, manifest: Manifest, tracker: Tracker, resume: Path | None = None) -> Path:
    model_cfg = build_model_config(cfg.model, manifest.vocab_size)
    counts = param_counts(model_cfg)
    tracker.log_params(
        {
            "model.vocab_size_resolved": model_cfg.vocab_size,
            "model.params_total": counts["total"],
            "model.params_non_embedding": counts["non_embedding"],
            "model.flops_per_token": flops_per_token(model_cfg, manifest.seq_len),
        }
    )
    checkpoint = train_and_follow(
        cfg,
        tracker,
        lambda tracking, beside: pretrain(
            model_cfg, cfg.train, cfg.scaling, cfg.run, manifest, tracking, resume, beside=beside
        ),
    )
    log_trained(cfg, tracker, checkpoint)
    return checkpoint


def train_and_follow(cfg: RaylmConfig, tracker: Tracker, train: Callable[[dict, float], tuple]) -> Location:
    """Run train(tracking, beside), a pretrain() call, with eval.during_training's
    follow-evaluator beside it, and wait for it to score the last checkpoint; returns that
    checkpoint. `beside`: the CPUs the evaluator's replicas take."""
    tracking = {"uri": tracker.uri, "run_id": tracker.run_id}
    with during_training(cfg, tracking) as follower:
        checkpoint = finished_checkpoint(*train(tracking, cpus_beside_training(cfg)))
        if follower is not None:
            followed = follower.wait(step_of(checkpoint))
            for name, rows in followed.tables.items():
                tracker.log_table(rows, name)
            steps = ", ".join(map(str, followed.steps)) or "none"
            lost = ", ".join(map(str, followed.removed))
            lost = f"; deleted before it could score them (raise train.keep_checkpoints): {lost}" if lost else ""
            print(f"[evaluate] during training: scored the checkpoints of steps {steps}{lost}", flush=True)
    return checkpoint


def log_trained(cfg: RaylmConfig, tracker: Tracker, checkpoint: Path, model_dir: Path | None = None) -> None:
    """Where the run's last checkpoint is, the model (model_dir: a LoRA run's merged one) and
    the loss curve."""
    tracker.set_tags({"raylm.checkpoint": str(checkpoint)})
    log_model(tracker, model_dir or checkpoint, cfg.tracking)
    log_loss_curve(tracker)


def finished_checkpoint(result, stopped: str | None) -> Location:
    """The last checkpoint of a training run; a run a SIGTERM stopped ends KILLED instead, and
    relaunching the same command resumes from that checkpoint."""
    checkpoint = Location.on(result.checkpoint.filesystem, result.checkpoint.path)
    if stopped:
        raise Interrupted(f"{stopped} ({checkpoint}); run the same command again to resume")
    return checkpoint


def do_finetune(cfg: RaylmConfig, tracker: Tracker, resume: Path | None = None) -> tuple[Manifest, Path]:
    """Prepare the fine-tuning windows, train from the base on the pretraining engine, and for
    LoRA also write the merged model; returns the windows' manifest and the last checkpoint."""
    base = resolve_base(cfg.finetune.base, Path(cfg.run.output_dir).resolve())
    manifest = finetune_windows(cfg, base)
    model_cfg = load_base_config(base, manifest.vocab_size)
    check_fits(cfg, base, model_cfg)
    lora = lora_config(cfg)
    with torch.device("meta"):  # shapes only: a 7B base would otherwise take 28 GB here
        trainable, total = trainable_counts(apply_lora(GPT(model_cfg), lora) if lora else GPT(model_cfg))
    tracker.log_params(
        {"finetune.base_resolved": str(base), "model.params_total": total, "model.params_trainable": trainable}
    )
    tracker.log_metrics(
        {f"data/{split}/{k}": v for split, st in manifest.splits.items() for k, v in st.metrics().items()}
    )
    print(f"[finetune] {cfg.finetune.mode} from {base}: {trainable:,} of {total:,} parameters trained", flush=True)
    checkpoint = train_and_follow(
        cfg,
        tracker,
        lambda tracking, beside: pretrain(
            model_cfg, cfg.train, cfg.scaling, cfg.run, manifest, tracking, resume, base, lora, beside=beside
        ),
    )
    merged = None
    if lora:  # the adapters folded in: a plain model directory for export-hf and serving
        merged = merge_on_a_worker(checkpoint, train_storage(cfg.run) / cfg.run.name / "merged")
        print(f"[finetune] merged LoRA adapters into {merged}", flush=True)
    log_trained(cfg, tracker, checkpoint, merged)
    return manifest, checkpoint


def do_evaluate(
    cfg: RaylmConfig, manifest: Manifest | None, checkpoint: Path, tracker: Tracker
) -> tuple[dict, str | None]:
    """The validation split (eval.max_tokens of it) where there is one, and a sample."""
    metrics = {}
    if manifest is not None:
        scores = evaluate(checkpoint, Path(manifest.path) / "val", cfg.eval.max_tokens, plan_replicas(cfg.eval))
        metrics = {f"final_val_{k}": v for k, v in scores.items()}
        tracker.log_metrics(metrics)
    e = cfg.eval
    if not e.sample_tokens:
        return metrics, None
    sample = sample_text(checkpoint, e.sample_prompt, e.sample_tokens, e.temperature, e.top_k, cfg.run.seed)
    tracker.log_text(
        f"# Sample from {checkpoint.name}\n\nPrompt: `{e.sample_prompt!r}`\n\n```\n{sample}\n```\n", "samples.md"
    )
    return metrics, sample


def do_texts(cfg: RaylmConfig, checkpoint: Path, tracker: Tracker) -> dict[str, dict[str, float]]:
    """Loss, perplexity and bits per byte on each eval.texts file, as text/<file stem>/<metric>."""
    replicas = plan_replicas(cfg.eval)
    scores = {Path(p).stem: evaluate_text(checkpoint, Path(p), replicas) for p in cfg.eval.texts}
    tracker.log_metrics({f"text/{name}/{k}": v for name, m in scores.items() for k, v in m.items()})
    return scores


def do_tasks(
    cfg: RaylmConfig, checkpoint: Path, tracker: Tracker, step: int | None = None
) -> dict[str, dict[str, float]]:
    """Score eval.tasks; metrics as task/<name>/<metric>, each task's per-example table as
    eval/<name>.json (the MLflow UI's artifact view shows it as a table); with a step (one
    checkpoint of several), metrics at that step and tables as eval/step_<step>/<name>.json."""
    e = cfg.eval
    if not e.tasks:
        return {}
    scores = score_tasks(checkpoint, e.tasks, e.task_limit, Path(e.task_data_dir), plan_replicas(e))
    tracker.log_metrics(scores.flat(), step)
    for name, rows in scores.rows.items():
        tracker.log_table(rows, table_name(name, step))
    return scores.metrics


def follow_run(cfg: RaylmConfig, address: str | None, idle_minutes: float, poll_seconds: float = 10.0) -> Tracker:
    """Evaluate each new whole checkpoint of cfg.run.name as training writes it (validation
    loss and eval.tasks, at the checkpoint's step), on Ray Data replicas beside the training
    workers. Ends after the checkpoint of train.max_steps, or after idle_minutes with none new."""
    manifest = prepared_data(cfg, ("evaluate",))
    start_ray(address)
    size_pools_for(cfg.cluster)
    run_dir = train_storage(cfg.run) / cfg.run.name
    seen: set[str] = set()
    with open_tracker(cfg, "evaluate") as tracker:
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < idle_minutes * 60:
            fresh = new_checkpoints(run_dir, seen)
            for checkpoint in fresh:
                seen.add(checkpoint.name)
                step = step_of(checkpoint)
                if evaluate_at_step(cfg, manifest, checkpoint, step, tracker) and step >= cfg.train.max_steps:
                    return tracker
            idle_since = time.monotonic() if fresh else idle_since
            time.sleep(0 if fresh else poll_seconds)
        print(f"[evaluate] no new checkpoint of {cfg.run.name!r} for {idle_minutes:g} min: stopping", flush=True)
    return tracker


def new_checkpoints(run_dir: Path, seen: set[str]) -> list[Path]:
    """Whole checkpoints not evaluated yet, oldest first (a half-written one is left for later)."""
    return [p for p in whole_checkpoints(run_dir) if p.name not in seen]


def evaluate_at_step(
    cfg: RaylmConfig, manifest: Manifest | None, checkpoint: Path, step: int, tracker: Tracker
) -> bool:
    """Score one checkpoint; False if the run deleted it meanwhile (train.keep_checkpoints)."""

    def score() -> tuple[dict, dict]:
        scores = {}
        if manifest is not None:
            scores = evaluate(checkpoint, Path(manifest.path) / "val", cfg.eval.max_tokens, plan_replicas(cfg.eval))
            tracker.log_metrics({f"val_{k}": v for k, v in scores.items()}, step)
        return scores, do_tasks(cfg, checkpoint, tracker, step)

    scored = unless_removed(checkpoint, score)
    if scored is None:
        return False
    scores, tasks = scored
    shown = [f"val loss {scores['loss']:.4f} | {scores['bits_per_byte']:.4f} bits/byte"] if scores else []
    print(f"[evaluate] {checkpoint.name}: {' | '.join(shown + [headline(tasks)] if tasks else shown)}", flush=True)
    return True


def lm_eval_job(
    cfg: RaylmConfig,
    checkpoint: Path,
    tasks: list[str],
    include_path: str | None,
    limit: int | None,
    num_fewshot: int | None,
) -> tuple[dict[str, dict[str, float]], Tracker]:
    """lm-eval tasks on a checkpoint, in this process; metrics as lm_eval/<task>/<metric> and
    lm-eval's whole results as eval/lm_eval.json, in an MLflow run of stage lm-eval."""
    from raylm.pipelines.eval.lm_eval_adapter import run_lm_eval

    with open_tracker(cfg, "lm-eval") as tracker:
        tracker.log_params({"lm_eval.checkpoint": str(checkpoint), "lm_eval.tasks": ",".join(tasks)})
        results = run_lm_eval(checkpoint, tasks, include_path, limit, num_fewshot)
        scores = {
            task: {
                k.split(",")[0]: float(v)
                for k, v in m.items()
                if isinstance(v, (int, float)) and "_stderr" not in k and k != "sample_len"
            }
            | {"examples": float(m.get("sample_len", 0))}
            for task, m in results["results"].items()
        }
        tracker.log_metrics({f"lm_eval/{t}/{k}": v for t, m in scores.items() for k, v in m.items()})
        tracker.log_text(
            json.dumps(
                {k: results[k] for k in ("results", "configs", "n-samples") if k in results}, indent=2, default=str
            ),
            "eval/lm_eval.json",
        )
    return scores, tracker


def find_checkpoint(cfg: RaylmConfig) -> Path:
    run_dir = train_storage(cfg.run) / cfg.run.name
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise DataError(f"run {cfg.run.name!r} has no checkpoint under {run_dir}: train it first or pass --checkpoint")
    return checkpoint
