"""`raylm tune`: a Ray Tune sweep whose trials are pretrain jobs (tuning/trial.py).

The driver prepares each distinct dataset the space asks for once, opens the sweep's MLflow
run, and runs a Tuner: the search algorithm proposes values, the scheduler stops trials that
trail, a stopper ends the sweep when its budget is spent. Tune keeps its state under
<output_dir>/tune/<sweep name>/, so an interrupted sweep resumes with --resume and finished
trials are not rerun; a restarted trial's Train run resumes from its own checkpoint.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import signal
import threading
import time
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from raylm.config import DataSection, TokenizerSection, flatten, section_fingerprint, set_key, validate
from raylm.errors import ConfigError, SweepInterrupted
from raylm.pipelines.data.prepare import prepare
from raylm.pipelines.runtime import size_pools_for, start_ray, tracking_uri
from raylm.pipelines.track.tracking import Tracker
from raylm.tuning.capacity import TRIAL_CPU, max_concurrent
from raylm.tuning.report import SweepResult, summarize
from raylm.tuning.space import LimitSection, SweepSpec, distribution, sweep_spent
from raylm.tuning.trial import Sweep, check_tune_session, find_child, plan_trial, run_trial

STATE = "raylm_sweep.json"  # beside Tune's own state: the sweep's MLflow run, for --resume


def run_sweep(base: dict, spec: SweepSpec, spec_text: str, address: str | None, resume: bool | str) -> SweepResult:
    """Run (or resume) the sweep of config tree `base` over `spec`; returns its summary."""
    check_tune_session()
    base = absolute_paths(base)
    cfg = validate(base, "config")
    if cfg.data.streaming:
        raise ConfigError("data.streaming: trials train on prepared windows; set it to false for a sweep")
    name, folder = cfg.run.name, Path(cfg.run.output_dir) / "tune"
    state_file = folder / name / STATE
    resume = wants_resume(folder / name, resume)
    resources = start_ray(address)
    size_pools_for(cfg.cluster)
    for data, tok in datasets(base, spec):
        prepare(data, tok, Path(cfg.run.output_dir))
    started = time.perf_counter()
    with open_parent(cfg, spec, spec_text, state_file) as tracker:
        sweep = Sweep(
            name,
            base,
            spec,
            tracker.uri,
            cfg.tracking.experiment,
            tracker.run_id,
            cfg.scaling.cpus_per_worker or default_worker_cpus(cfg.scaling.use_gpu),
        )
        concurrency = max_concurrent(spec, cfg.scaling, sweep.cpus_per_worker, resources)
        tuner = make_tuner(sweep, folder, concurrency, resume)
        print(
            f"[tune] sweep {name!r}: {spec.search.algorithm} search, {spec.scheduler.name} scheduler, "
            f"up to {concurrency} trials at once -> {folder / name}",
            flush=True,
        )
        grid, interrupted = fit(tuner)
        out = summarize(grid, sweep, tracker, folder / name, time.perf_counter() - started, concurrency, interrupted)
        if interrupted:
            raise SweepInterrupted(
                f"sweep {name!r} interrupted after {len(grid)} trials; Tune saved its state: "
                "run the same command with --resume to continue it"
            )
        return out


def fit(tuner: tune.Tuner):
    """Run the sweep; returns its ResultGrid and whether Ctrl-C cut it short. Tune turns the
    first SIGINT into a clean stop (running trials stopped, state saved) and, only then, puts
    the previous SIGINT handler back: that is how an interrupted sweep is told apart."""
    main = (
        threading.current_thread() is threading.main_thread()
        and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0"
    )
    previous = signal.getsignal(signal.SIGINT)
    grid = tuner.fit()
    interrupted = main and signal.getsignal(signal.SIGINT) is previous
    if main:
        signal.signal(signal.SIGINT, previous)  # Tune's handler would swallow a later Ctrl-C
    return grid, interrupted


def absolute_paths(base: dict) -> dict:
    """Trials run in other processes and working directories: pin the outputs and the MLflow
    store the driver would use."""
    base = copy.deepcopy(base)
    output = Path(base.get("run", {}).get("output_dir", "runs")).resolve()
    set_key(base, "run.output_dir", str(output))
    set_key(base, "tracking.tracking_uri", tracking_uri(base.get("tracking", {}).get("tracking_uri")))
    return base


def datasets(base: dict, spec: SweepSpec) -> list[tuple[DataSection, TokenizerSection]]:
    """Each distinct data/tokenizer section the space can produce, to prepare before any trial
    starts (trials only read prepared windows). Such keys must be a choice or grid."""
    keys = [k for k in spec.space if k.startswith(("data.", "tokenizer."))]
    options = []
    for key in keys:
        kind, values = distribution(spec.space[key])
        if kind not in ("choice", "grid", "fixed"):
            raise ConfigError(
                f"space.{key}: data and tokenizer keys take choice or grid (each value's data is "
                f"prepared before the trials), not {kind}"
            )
        options.append(values if kind != "fixed" else [values])
    found = []
    for combo in itertools.product(*options):
        raw = copy.deepcopy(base)
        for key, value in zip(keys, combo):
            set_key(raw, key, value)
        try:
            pair = (
                DataSection.model_validate(raw.get("data", {})),
                TokenizerSection.model_validate(raw.get("tokenizer", {})),
            )
        except ValueError:
            continue  # a combination no trial can use: its trials are pruned with the reason
        if all(section_fingerprint(*pair) != section_fingerprint(*p) for p in found):
            found.append(pair)
    return found


def open_parent(cfg, spec: SweepSpec, spec_text: str, state_file: Path) -> Tracker:
    """The sweep's MLflow run: new, or the interrupted sweep's run again."""
    uri = tracking_uri(cfg.tracking.tracking_uri)
    if state_file.exists():
        return Tracker(uri, cfg.tracking.experiment, "", {}, run_id=json.loads(state_file.read_text())["parent_run_id"])
    tags = {"raylm.stage": "tune", "raylm.sweep": cfg.run.name, "raylm.config_hash": section_fingerprint(cfg)}
    tracker = Tracker(uri, cfg.tracking.experiment, f"tune-{cfg.run.name}", tags)
    tracker.log_params({f"base.{k}": v for k, v in cfg.flat().items()} | sweep_params(spec))
    tracker.log_text(cfg.to_yaml(), "config.yaml")
    tracker.log_text(spec_text, "sweep.yaml")
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"parent_run_id": tracker.run_id}))
    return tracker


def sweep_params(spec: SweepSpec) -> dict:
    flat = flatten(spec.model_dump(mode="json", exclude={"space"}))
    return {f"sweep.{k}": v for k, v in flat.items()} | {f"space.{k}": json.dumps(v) for k, v in spec.space.items()}


def default_worker_cpus(use_gpu: bool) -> float:
    """A sweep shares the cluster between trials, so a worker does not take 'its share of
    the cluster' as a lone run does: one core, less the trial's own 0.01, so that a 1-worker
    trial fits on one core and 2 run at once on 2 cores."""
    return 1.0 if use_gpu else 1.0 - TRIAL_CPU


def wants_resume(sweep_dir: Path, mode: bool | str) -> bool:
    """--resume: continue the sweep in sweep_dir. --resume auto: continue it if there is one,
    else start it (a retried or resubmitted RayJob runs the same command again)."""
    exists = (sweep_dir / STATE).exists()
    if mode == "auto":
        return exists and tune.Tuner.can_restore(str(sweep_dir))
    if exists and not mode:
        raise ConfigError(
            f"run.name={sweep_dir.name!r} already has a sweep in {sweep_dir}: pass --resume to continue "
            "it, or choose another run.name"
        )
    if mode and not tune.Tuner.can_restore(str(sweep_dir)):
        raise ConfigError(f"--resume: no sweep to resume in {sweep_dir}")
    return bool(mode)


def make_tuner(sweep: Sweep, folder: Path, concurrency: int, resume: bool) -> tune.Tuner:
    # raylm prints one line per trial event (TrialLog): no status table every few seconds,
    # and no TensorBoard logger, which warns about a pruned trial's infinite loss.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), {"cpu": TRIAL_CPU})
    if resume:
        # Unfinished and errored trials run again; a trial's Train run resumes from its checkpoint.
        return tune.Tuner.restore(str(folder / sweep.name), trainable, resume_unfinished=True, resume_errored=True)
    spec = sweep.spec
    return tune.Tuner(
        trainable,
        param_space=tune_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode="min",
            search_alg=make_search(spec, concurrency),
            scheduler=make_scheduler(sweep),
            num_samples=num_samples(spec),
            reuse_actors=reuse_actors(spec),
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=str(folder),
            verbose=0,
            stop=BudgetStopper(spec.budget.sweep),
            callbacks=[
                JsonLoggerCallback(),
                CSVLoggerCallback(),  # what ResultGrid reads
                TrialLog(sweep.tracking_uri, sweep.experiment, sweep.parent_run_id),
            ],
        ),
    )


def reuse_actors(spec: SweepSpec) -> bool:
    """Let a finished trial's process (torch, Ray Train and MLflow imported: ~10 s on 2 cores)
    run the next trial: measured 1.40x -> 1.10x sweep overhead (benchmarks/tune_overhead.py).
    Only under FIFO: a trial stopped early is still inside trainer.fit() when Tune hands its
    process to the next trial, and Tune then fails that trial ("reuse requires reset_config")."""
    return spec.scheduler.name == "fifo"


def num_samples(spec: SweepSpec) -> int:
    return spec.search.num_samples or (1 if spec.search.algorithm == "grid" else 8)


def tune_space(spec: SweepSpec) -> dict:
    """Tune's distributions under the dotted keys; randint's high is inclusive in the file and
    exclusive in Tune."""
    makers = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(a[0], a[1] + 1),
    }
    space = {}
    for key, entry in spec.space.items():
        kind, args = distribution(entry)
        space[key] = args if kind == "fixed" else makers[kind](args)
    return space


def make_search(spec: SweepSpec, concurrency: int):
    """The search algorithm, holding back trials beyond `concurrency` (TuneConfig's
    max_concurrent_trials is ignored for a variant generator passed in, as here)."""
    if spec.search.algorithm != "optuna":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=concurrency, random_state=spec.search.seed)
    try:
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError("search.algorithm optuna needs Optuna: pip install 'raylm[tune]'") from None
    return ConcurrencyLimiter(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=spec.search.seed)), concurrency)


def make_scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    s = sweep.spec.scheduler
    horizon = trial_horizon(sweep)
    grace = s.grace_period or horizon["first_eval"]
    if s.name == "asha":
        # max_t far beyond any trial: ASHA stops a trial that reaches max_t, and trials of a
        # FLOP budget differ in length (a smaller model takes more steps).
        return ASHAScheduler(
            time_attr=s.time_attr, max_t=2**53, grace_period=grace, reduction_factor=s.reduction_factor
        )
    if s.name == "hyperband":
        return HyperBandScheduler(time_attr=s.time_attr, max_t=horizon["end"], reduction_factor=s.reduction_factor)
    return FIFOScheduler()


def trial_horizon(sweep: Sweep) -> dict:
    """The base config's first evaluation and its end, in the scheduler's time unit."""
    plan = plan_trial(sweep, {}, "base")
    if plan.reason:
        raise ConfigError(f"the base config cannot train as a trial: {plan.reason}")
    tokens_per_step = plan.cfg.train.batch_size * plan.manifest.seq_len
    per_step = {"step": 1, "tokens_seen": tokens_per_step, "flops_seen": tokens_per_step * plan.flops_per_token}
    unit = per_step[sweep.spec.scheduler.time_attr]
    return {"first_eval": plan.cfg.train.eval_interval * unit, "end": plan.cfg.train.max_steps * unit}


class BudgetStopper(tune.Stopper):
    """Ends the whole sweep once its budget is spent: tokens, FLOPs and dollars summed over
    every trial's latest report, hours of wall clock since the sweep (or its resume) began."""

    def __init__(self, limit: LimitSection):
        self.limit, self.spent, self.started = limit, {}, time.time()
        self.reason: str | None = None

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.spent[trial_id] = {k: float(result.get(k, 0.0)) for k in ("tokens_seen", "flops_seen", "cost_usd")}
        return False

    def stop_all(self) -> bool:
        self.reason = self.reason or sweep_spent(self.spent, self.limit, (time.time() - self.started) / 3600)
        if self.reason:
            print(f"[tune] stopping the sweep: {self.reason}", flush=True)
        return self.reason is not None


class TrialLog(tune.Callback):
    """One line per trial event on the driver, and no trial's MLflow run left RUNNING: a
    trial the scheduler or the budget stopped is ended FINISHED, an errored one FAILED."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str):
        self.uri, self.experiment, self.parent_run_id = uri, experiment, parent_run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        shown = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
        print(f"[tune] trial {trial.trial_id} started: {shown}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "val_loss" in result and not result.get("pruned"):
            print(
                f"[tune] trial {trial.trial_id} step {result.get('step')}: val loss {result['val_loss']:.4f}",
                flush=True,
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial.trial_id, RunStatus.FINISHED, "stopped")

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[tune] trial {trial.trial_id} failed: see {trial.path}", flush=True)
        self._end(trial.trial_id, RunStatus.FAILED, "error")

    def _end(self, trial_id: str, status: int, label: str) -> None:
        run_id = find_child(self.uri, self.experiment, self.parent_run_id, trial_id)
        client = MlflowClient(self.uri)
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "raylm.trial_status", label)
            client.set_terminated(run_id, RunStatus.to_string(status))


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
