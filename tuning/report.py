"""What a finished sweep leaves behind, in the sweep's MLflow run and in its folder:

best_config.yaml                  the best completed trial's whole config: `raylm run` it
trials.json                       one row per trial (MLflow shows it as a table)
plots/val_loss_vs_compute.png     each trial's validation loss against FLOPs trained
scaling_law.md / .json, plots/scaling_law.png   with scaling_law.flops set
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.tracking import MlflowClient

from raylm.fmt import figure, save_figure
from raylm.models import param_counts
from raylm.pipelines.track.tracking import Tracker
from raylm.tuning.scaling_law import TooFewPoints, describe, fit_law, plot_law, recommend
from raylm.tuning.space import sweep_spent
from raylm.tuning.trial import Sweep, find_child, plan_trial

METRIC_KEYS = ("step", "tokens_seen", "flops_seen", "cost_usd", "train_seconds")


@dataclass
class TrialRow:
    trial_id: str
    status: str  # completed | early_stopped (by the scheduler) | stopped (sweep budget, Ctrl-C) | pruned | error
    value: float | None  # the sweep's metric at the trial's last report
    params: dict
    params_non_embedding: int | None = None
    seconds: float = 0.0  # the trial's own running time, as Tune measured it
    spent: dict = field(default_factory=dict)  # METRIC_KEYS at the last report


@dataclass
class SweepResult:
    rows: list[TrialRow]
    best: TrialRow | None
    best_config: Path | None
    stopped_by: str | None  # the sweep budget that ended it, if one did
    scaling_law: str | None  # the recommendation, or why there is none
    wall_seconds: float
    concurrency: int
    run_id: str

    @property
    def overhead(self) -> float:
        """Sweep wall time over the time its trials needed at this concurrency: Tune's bookkeeping."""
        busy = sum(r.seconds for r in self.rows) / self.concurrency
        return self.wall_seconds / busy if busy else float("nan")


def summarize(
    grid, sweep: Sweep, tracker: Tracker, folder: Path, wall: float, concurrency: int, interrupted: bool = False
) -> SweepResult:
    rows = [trial_row(result, sweep) for result in grid]
    stopped_by = sweep_spent({r.trial_id: r.spent for r in rows}, sweep.spec.budget.sweep, wall / 3600)
    finish_children(rows, sweep, "interrupted (Ctrl-C)" if interrupted else stopped_by)
    done = [r for r in rows if r.status == "completed" and r.value is not None]
    best = min(done, key=lambda r: r.value) if done else None
    out = SweepResult(rows, best, None, stopped_by, None, wall, concurrency, tracker.run_id)
    if best:
        out.best_config = export_best(best, sweep, folder)
        tracker.log_artifact(out.best_config)
    tracker.log_text(trials_table(rows, sweep.spec.metric), "trials.json")
    plot_curves(grid, sweep.spec.metric, folder / "plots" / "val_loss_vs_compute.png")
    tracker.log_artifact(folder / "plots" / "val_loss_vs_compute.png", "plots")
    if sweep.spec.scaling_law.flops:
        out.scaling_law = scaling_law(done, sweep, tracker, folder)
    tracker.log_metrics(sweep_metrics(out, sweep.spec.metric))
    if stopped_by:
        tracker.set_tags({"raylm.sweep_stopped_by": stopped_by})
    return out


def trial_row(result, sweep: Sweep) -> TrialRow:
    m = result.metrics or {}
    trial_id = m.get("trial_id") or Path(result.path).name
    params = result.config or {}
    row = TrialRow(
        trial_id,
        "error" if result.error else "stopped",
        m.get(sweep.spec.metric),
        params,
        seconds=float(m.get("time_total_s", 0.0)),
        spent={k: float(m.get(k, 0.0)) for k in METRIC_KEYS},
    )
    plan = plan_trial(sweep, params, trial_id)
    if m.get("pruned") or plan.reason:
        row.status, row.value = "pruned", None
    elif plan.model:
        row.params_non_embedding = param_counts(plan.model)["non_embedding"]
    return row


def finish_children(rows: list[TrialRow], sweep: Sweep, stopped_by: str | None) -> None:
    """Each trial's final status, from its MLflow run (a trial that ran to its end tagged
    itself completed) and the sweep: the rest were stopped early by the scheduler, or by the
    sweep budget. The status is tagged on the trial's run for the MLflow UI, and a stopped
    trial's run ends FINISHED, like Ray's own MLflow callback ends it (the trial process may
    have marked it FAILED as Tune tore its Train run down)."""
    client = MlflowClient(sweep.tracking_uri)
    for row in rows:
        run_id = find_child(sweep.tracking_uri, sweep.experiment, sweep.parent_run_id, row.trial_id)
        run = client.get_run(run_id) if run_id else None
        tagged = run.data.tags.get("raylm.trial_status") if run else None
        if row.status == "stopped":
            row.status = "completed" if tagged == "completed" else "stopped" if stopped_by else "early_stopped"
        if run and tagged != row.status:
            client.set_tag(run_id, "raylm.trial_status", row.status)
        if run and row.status != "error" and run.info.status != "FINISHED":
            client.set_terminated(run_id, "FINISHED")


def export_best(best: TrialRow, sweep: Sweep, folder: Path) -> Path:
    """The best trial's whole config, named for a fresh run: `raylm run best_config.yaml`
    trains the same model on the same data with the same steps and seed."""
    cfg = plan_trial(sweep, best.params, best.trial_id).cfg
    cfg.run.name = f"{sweep.name}-best"
    path = folder / "best_config.yaml"
    header = (
        f"# Best trial {best.trial_id} of sweep {sweep.name!r}: {sweep.spec.metric} {best.value:.4f}\n"
        f"# Its values: {json.dumps(best.params, default=str)}\n"
    )
    path.write_text(header + cfg.to_yaml())
    return path


def trials_table(rows: list[TrialRow], metric: str) -> str:
    """MLflow's table format (what log_table writes, which would append to a resumed sweep's
    table instead of replacing it)."""
    dicts = [row_dict(r, metric) for r in rows]
    columns = list(dict.fromkeys(k for d in dicts for k in d))
    return json.dumps({"columns": columns, "data": [[d.get(c) for c in columns] for d in dicts]}, default=str)


def row_dict(row: TrialRow, metric: str) -> dict:
    return {
        "trial_id": row.trial_id,
        "status": row.status,
        metric: row.value,
        "seconds": round(row.seconds, 2),
        "params_non_embedding": row.params_non_embedding,
        **row.spent,
        **{k: row.params[k] for k in sorted(row.params)},
    }


def sweep_metrics(out: SweepResult, metric: str) -> dict[str, float]:
    counts = {
        f"trials_{s}": sum(r.status == s for r in out.rows)
        for s in ("completed", "early_stopped", "stopped", "pruned", "error")
    }
    totals = {
        f"sweep_{k}": sum(r.spent.get(k, 0.0) for r in out.rows) for k in ("tokens_seen", "flops_seen", "cost_usd")
    }
    best = {f"best_{metric}": out.best.value} if out.best else {}
    return counts | totals | best | {"sweep_wall_seconds": out.wall_seconds, "tune_overhead_ratio": out.overhead}


def plot_curves(grid, metric: str, path: Path) -> None:
    fig, ax = figure((7, 4.5))
    for result in grid:
        df = result.metrics_dataframe
        if df is None or metric not in df or "flops_seen" not in df:
            continue
        df = df[df["flops_seen"] > 0]
        if len(df):
            ax.plot(df["flops_seen"], df[metric], marker="o", ms=3, label=str(df["trial_id"].iloc[-1]))
    ax.set(
        xscale="log",
        xlabel="training FLOPs",
        ylabel=metric.replace("_", " "),
        title="trials: validation loss against compute",
    )
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def scaling_law(done: list[TrialRow], sweep: Sweep, tracker: Tracker, folder: Path) -> str:
    """Fit L(N, D) over the completed trials and recommend N and D for scaling_law.flops, or
    say why the trials cannot support a fit."""
    law = sweep.spec.scaling_law
    n = [float(r.params_non_embedding) for r in done]
    d = [r.spent["tokens_seen"] for r in done]
    loss = [r.value for r in done]
    try:
        fit = fit_law(n, d, loss, law.min_points)
    except TooFewPoints as err:
        text = f"no scaling-law fit: {err}"
        tracker.log_text(f"# Scaling law\n\n{text}\n", "scaling_law.md")
        return text
    rec = recommend(fit, law.flops, max(6 * a * b for a, b in zip(n, d)))
    text = describe(rec)
    tracker.log_text(json.dumps(rec, indent=2), "scaling_law.json")
    tracker.log_text(
        f"# Scaling law\n\n{text}\n\nN: non-embedding parameters; D: tokens trained; compute C = 6ND.\n",
        "scaling_law.md",
    )
    plot_law(fit, n, d, loss, rec, folder / "plots" / "scaling_law.png")
    tracker.log_artifact(folder / "plots" / "scaling_law.png", "plots")
    return text


def print_result(out: SweepResult, metric: str) -> None:
    print(
        f"raylm tune finished in {out.wall_seconds:.0f} s: {len(out.rows)} trials, {out.concurrency} at once "
        f"(Tune overhead {out.overhead:.2f}x)"
    )
    for r in sorted(out.rows, key=lambda r: (r.value is None, r.value or 0.0)):
        value = f"{r.value:.4f}" if r.value is not None else "-"
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.params.items())
        print(f"  {r.trial_id:<14} {r.status:<13} {metric} {value:<8} step {int(r.spent['step']):<5} {shown}")
    if out.stopped_by:
        print(f"  budget      the sweep stopped: {out.stopped_by}")
    if out.best:
        print(f"  best        {out.best.trial_id}: {metric} {out.best.value:.4f} -> {out.best_config}")
    else:
        print("  best        no trial completed")
    if out.scaling_law:
        print(f"  scaling law {out.scaling_law}")
    print(f"  MLflow      sweep run {out.run_id} (one child run per trial)")
