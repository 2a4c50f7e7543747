"""One trial of a sweep: sampled values -> a config -> the pretrain job, reporting to Tune.

Ray Train V2 cannot be handed to a Tuner (TuneError), so each trial is a function that calls
pipelines.train.pretrain.pretrain with Ray Train's TuneReportCallback: every report of the training
run (one per evaluation: val loss, step, tokens, FLOPs, dollars) reaches Tune's scheduler.
The trial holds 0.01 CPU itself; its Train workers reserve their own CPUs and GPUs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient
from ray import tune

from raylm.config import RaylmConfig, section_fingerprint
from raylm.errors import RaylmError
from raylm.models import ModelConfig, flops_per_token, param_counts
from raylm.pipelines.data.manifest import Manifest
from raylm.pipelines.data.prepare import find_prepared
from raylm.pipelines.runtime import incompatible, private_module, require
from raylm.pipelines.track.tracking import Tracker
from raylm.pipelines.train.pretrain import build_model_config, pretrain
from raylm.tuning.space import SweepSpec, trial_config, trial_steps


@dataclass
class Sweep:
    """What every trial needs; sent to the trials once, with tune.with_parameters."""

    name: str
    base: dict  # the config tree as written, paths made absolute
    spec: SweepSpec
    tracking_uri: str
    experiment: str
    parent_run_id: str
    cpus_per_worker: float


@dataclass
class Plan:
    """A trial's resolved config and what it will cost, or why it cannot run."""

    cfg: RaylmConfig | None
    model: ModelConfig | None = None
    manifest: Manifest | None = None
    reason: str | None = None  # set: the trial is pruned

    @property
    def flops_per_token(self) -> int:
        return flops_per_token(self.model, self.manifest.seq_len)


def plan_trial(sweep: Sweep, params: dict, trial_id: str) -> Plan:
    """The config a trial trains with: the base plus its values, its own run name, the trial
    budget turned into max_steps (so the schedule ends at the budget), and one report to Tune
    per evaluation. The driver calls this too, to describe trials and export the best."""
    cfg, reason = trial_config(sweep.base, params)
    if reason:
        return Plan(None, reason=reason)
    cfg.run.name = f"{sweep.name}-{trial_id}"
    cfg.scaling.cpus_per_worker = cfg.scaling.cpus_per_worker or sweep.cpus_per_worker
    try:
        manifest = find_prepared(cfg.data, cfg.tokenizer, Path(cfg.run.output_dir))
        model = build_model_config(cfg.model, manifest.vocab_size)
    except RaylmError as err:
        return Plan(None, reason=str(err))
    plan = Plan(cfg, model, manifest)
    return apply_budget(plan, sweep.spec)


def apply_budget(plan: Plan, spec: SweepSpec) -> Plan:
    train, limit = plan.cfg.train, spec.budget.trial
    steps = trial_steps(train.batch_size * plan.manifest.seq_len, plan.flops_per_token, limit)
    if steps is not None:
        if steps <= train.warmup_steps:
            return Plan(
                None,
                reason=f"the trial budget buys {steps} steps of this model and batch, "
                f"not more than train.warmup_steps={train.warmup_steps}",
            )
        train.max_steps = steps
    if limit.hours:
        train.max_hours = min(train.max_hours or math.inf, limit.hours)
    if limit.usd:
        train.max_usd = min(train.max_usd or math.inf, limit.usd)
    train.checkpoint_interval = train.eval_interval  # each evaluation reaches Tune (with a checkpoint)
    return plan


def run_trial(params: dict, sweep: Sweep) -> None:
    """Tune's trainable: train one trial, or report it pruned with the reason."""
    trial_id = tune.get_context().get_trial_id()
    plan = plan_trial(sweep, params, trial_id)
    if plan.reason:
        print(f"[tune] trial {trial_id} pruned: {plan.reason}", flush=True)
        with child_run(sweep, trial_id, None, params) as tracker:
            tracker.set_tags({"raylm.trial_status": "pruned", "raylm.prune_reason": plan.reason[:5000]})
        tune.report({sweep.spec.metric: math.inf, "pruned": 1, "step": 0, "tokens_seen": 0, "flops_seen": 0.0})
        return
    stop = tune_stop_event()
    with child_run(sweep, trial_id, plan, params) as tracker:
        try:
            result, stopped = pretrain(
                plan.model,
                plan.cfg.train,
                plan.cfg.scaling,
                plan.cfg.run,
                plan.manifest,
                {"uri": tracker.uri, "run_id": tracker.run_id},
                callbacks=[tune_report_callback()],
                stop_event=stop,
            )
        except Exception as err:
            if not stop.is_set():
                raise
            # Tune asked the trial to stop, then tore its Train run down before it had: the
            # trial was stopped, not failed (ended FAILED here, its run could stay FAILED if
            # this came after the driver had ended it FINISHED; seen once in the suite).
            first = (str(err).splitlines() or [type(err).__name__])[0][:200]
            print(f"[tune] trial {trial_id} stopped while shutting down: {first}", flush=True)
            return
        if stopped:  # the scheduler (or Ctrl-C) stopped the trial; the driver records which
            return
        final = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        tracker.log_metrics({f"final_{k}": v for k, v in final.items() if k.startswith("val_")} | pick_cost(final))
        tracker.set_tags({"raylm.trial_status": "completed"})
    # The last report again, once Train has shut down and MLflow has the final metrics: Tune's
    # time_total_s then covers the whole trial (what benchmarks/tune_overhead.py compares with).
    tune.report({**final, "completed": 1})


def tune_stop_event():
    """Set when Tune stops this trial (a scheduler decision, the sweep's end). Tune cannot
    stop a function trial's thread, and with actor reuse its Train run would train on.
    Ray has no public way for a function trainable to learn it was stopped: this is the event
    Tune's FunctionTrainable sets, on the session where TuneReportCallback finds its queue too
    (check_tune_session vets both before the sweep starts)."""
    session = private_module("ray.train._internal.session", "ray")
    return require(require(session, "get_session", "ray")(), "stop_event", "ray")


def check_tune_session(session=None) -> None:
    """Before Ray starts: the Ray Train session API tune_stop_event reads in every trial is
    there, so that a Ray release that moved it fails the sweep at once, in one line, instead of
    every trial (`session`: a stand-in for the module, in tests)."""
    session = session or private_module("ray.train._internal.session", "ray")
    require(session, "get_session", "ray")
    reset = require(require(session, "_TrainSession", "ray"), "reset", "ray")  # where it creates stop_event
    if "stop_event" not in reset.__code__.co_names:
        raise incompatible(f"{session.__name__}._TrainSession.stop_event", "ray")


def tune_report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback()


def pick_cost(metrics: dict) -> dict:
    keys = ("tokens_seen", "flops_seen", "train_seconds", "cost_usd", "accelerator_hours")
    return {k: metrics[k] for k in keys if k in metrics}


def child_run(sweep: Sweep, trial_id: str, plan: Plan | None, params: dict) -> Tracker:
    """The trial's MLflow run, nested under the sweep's (tag mlflow.parentRunId); a trial
    restarted by a resumed sweep reopens its run instead of adding a second one."""
    existing = find_child(sweep.tracking_uri, sweep.experiment, sweep.parent_run_id, trial_id)
    tags = {
        "mlflow.parentRunId": sweep.parent_run_id,
        "raylm.stage": "trial",
        "raylm.sweep": sweep.name,
        "raylm.trial_id": trial_id,
        "raylm.trial_params": json.dumps(params, default=str)[:5000],
    }
    tracker = Tracker(sweep.tracking_uri, sweep.experiment, f"{sweep.name}-{trial_id}", tags, run_id=existing)
    if existing is None:
        tracker.log_params({f"trial.{k}": v for k, v in params.items()})
        if plan:
            tracker.log_params(plan.cfg.flat() | trial_params(plan))
            tracker.set_tags({"raylm.config_hash": section_fingerprint(plan.cfg)})
            tracker.log_text(plan.cfg.to_yaml(), "config.yaml")
    return tracker


def trial_params(plan: Plan) -> dict:
    counts = param_counts(plan.model)
    return {
        "model.params_total": counts["total"],
        "model.params_non_embedding": counts["non_embedding"],
        "model.flops_per_token": plan.flops_per_token,
        "trial.planned_tokens": plan.cfg.train.max_steps * plan.cfg.train.batch_size * plan.manifest.seq_len,
    }


def find_child(uri: str, experiment: str, parent_run_id: str, trial_id: str) -> str | None:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        max_results=1,
        filter_string=(f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`raylm.trial_id` = '{trial_id}'"),
    )
    return runs[0].info.run_id if runs else None
