"""The sweep file of `raylm tune --space s.yaml`: what to search, how, and within what budget.

    metric: val_loss                       # or val_bits_per_byte; always minimized
    search: {algorithm: random, num_samples: 8, seed: 0}       # random | grid | optuna
    scheduler: {name: asha, grace_period: 40, reduction_factor: 2}   # fifo | asha | hyperband
    budget:
      trial: {flops: 2.0e12}               # each trial trains to this much compute
      sweep: {usd: 5.0, hours: 2}          # the whole sweep stops when one is spent
    space:                                 # any dotted config path, as in --set
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.n_layer: {choice: [2, 4, 6]}
      model.n_head: {grid: [2, 4]}
      train.warmup_steps: {randint: [0, 50]}   # both ends included
      train.weight_decay: 0.1               # a plain value: fixed for every trial

This module only reads and checks the file (no Ray): a bad key or value fails before Ray
starts, naming it. Combinations that only fail together (n_head not dividing n_embd) are not
errors here; `trial_config` turns them into a pruned trial with the reason.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from raylm.config import RaylmConfig, Section, describe, field_problems, set_key, validate
from raylm.errors import ConfigError

# name -> how many numbers it takes (None: a list of candidate values)
DISTRIBUTIONS = {"choice": None, "grid": None, "uniform": 2, "loguniform": 2, "randint": 2}


class SearchSection(Section):
    # random: Tune's variant generator (grid entries are crossed with random samples);
    # grid: every space entry must be a grid; optuna: Optuna's TPE sampler.
    algorithm: Literal["random", "grid", "optuna"] = "random"
    num_samples: int | None = Field(None, gt=0)  # trials; for grid, repeats of the whole grid. None: 8, grid 1
    # None: as many as the cluster's CPUs/GPUs hold (tuning/capacity.py); `raylm cluster render`
    # writes the count its worker groups hold, as an autoscaling cluster starts with none up.
    max_concurrent_trials: int | None = Field(None, gt=0)
    seed: int = 0  # the sampler's seed: the same file draws the same trials


class SchedulerSection(Section):
    # asha / hyperband: stop trials whose metric trails the others' at the same point.
    name: Literal["fifo", "asha", "hyperband"] = "asha"
    # What "the same point" counts: optimizer steps, or tokens or FLOPs trained (fair between
    # model sizes and batch sizes).
    time_attr: Literal["step", "tokens_seen", "flops_seen"] = "step"
    grace_period: float | None = Field(None, gt=0)  # in time_attr units; None: the first evaluation
    reduction_factor: float = Field(2.0, gt=1)


class LimitSection(Section):
    """A compute budget; every limit given applies, the first one spent wins."""

    tokens: float | None = Field(None, gt=0)
    flops: float | None = Field(None, gt=0)  # training FLOPs (6N + attention, models/config.py)
    hours: float | None = Field(None, gt=0)  # trial: training hours; sweep: wall-clock hours
    usd: float | None = Field(None, gt=0)  # priced as training prices it (pipelines/train/cost.py)


def sweep_spent(spent: dict[str, dict], limit: LimitSection, hours: float) -> str | None:
    """Why the sweep must stop (a budget.sweep limit is spent), or None."""
    total = {k: sum(s.get(k, 0.0) for s in spent.values()) for k in ("tokens_seen", "flops_seen", "cost_usd")}
    checks = [
        (limit.tokens, total["tokens_seen"], "tokens", "{:,.0f}"),
        (limit.flops, total["flops_seen"], "flops", "{:.3g}"),
        (limit.usd, total["cost_usd"], "usd", "${:.4f}"),
        (limit.hours, hours, "hours", "{:.3f} h"),
    ]
    for cap, used, key, fmt in checks:
        if cap and used >= cap:
            return f"budget.sweep.{key}={cap:g} spent ({fmt.format(used)})"
    return None


class BudgetSection(Section):
    # trial: a token or FLOP limit sets the trial's max_steps, so its learning-rate schedule
    # ends at the budget and the objective is the loss at a fixed compute; hours and dollars
    # stop it early (train.max_hours, train.max_usd).
    trial: LimitSection = LimitSection()
    sweep: LimitSection = LimitSection()  # summed over all trials; spent: the sweep stops


class ScalingLawSection(Section):
    """Fit L(N, D) = E + A/N^alpha + B/D^beta over finished trials (Hoffmann et al. 2022)."""

    flops: float | None = Field(None, gt=0)  # recommend N and D for this compute; None: no fit
    min_points: int = Field(8, ge=6)  # finished trials needed: the law has 5 parameters


class SweepSpec(Section):
    metric: Literal["val_loss", "val_bits_per_byte"] = "val_loss"
    search: SearchSection = SearchSection()
    scheduler: SchedulerSection = SchedulerSection()
    budget: BudgetSection = BudgetSection()
    scaling_law: ScalingLawSection = ScalingLawSection()
    space: dict[str, Any] = Field(min_length=1)

    @model_validator(mode="after")
    def _distributions(self) -> SweepSpec:
        for key, entry in self.space.items():
            check_entry(key, entry)
        kinds = {distribution(entry)[0] for entry in self.space.values()}
        if self.search.algorithm == "optuna" and "grid" in kinds:
            raise ValueError("search.algorithm optuna samples; it cannot take grid entries (use choice)")
        if self.search.algorithm == "grid" and kinds - {"grid", "fixed"}:
            raise ValueError("search.algorithm grid needs every space entry to be a grid (or a plain value)")
        return self


def distribution(entry: Any) -> tuple[str, Any]:
    """("loguniform", [1e-4, 1e-2]) for {loguniform: [...]}; ("fixed", value) for a plain value."""
    if isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)) in DISTRIBUTIONS:
        return next(iter(entry.items()))
    return "fixed", entry


def check_entry(key: str, entry: Any) -> None:
    kind, args = distribution(entry)
    if isinstance(entry, dict) and kind == "fixed":
        raise ValueError(f"space.{key}: expected one of {', '.join(DISTRIBUTIONS)} or a plain value, got {entry!r}")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ValueError(f"space.{key}: {kind} takes a non-empty list of values")
    elif kind != "fixed":
        if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)):
            raise ValueError(f"space.{key}: {kind} takes [low, high]")
        low, high = args
        if low >= high or (kind == "loguniform" and low <= 0):
            raise ValueError(
                f"space.{key}: {kind} needs 0 < low < high"
                if kind == "loguniform"
                else f"space.{key}: {kind} needs low < high"
            )
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ValueError(f"space.{key}: randint takes integers")


def load_sweep(path: str | Path, base: dict) -> SweepSpec:
    """The sweep file, checked on its own and against the base config tree `base`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    return parse_sweep(path.read_text(), str(path), base)


def parse_sweep(text: str, source: str, base: dict) -> SweepSpec:
    """A sweep file's text (`source` names it in errors), checked as load_sweep checks it."""
    try:
        spec = SweepSpec.model_validate(yaml.safe_load(text) or {})
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}".replace("\n", " ")) from None
    except ValidationError as err:
        raise ConfigError(describe(err, source=source).replace("invalid config", "invalid sweep")) from None
    for key, entry in spec.space.items():
        check_values(base, key, entry)
    return spec


def check_values(base: dict, key: str, entry: Any) -> None:
    """Every value a space entry can take must suit its config key (type, range), each on its
    own: an unknown key or a string where a number goes fails now, not in trial 37."""
    kind, args = distribution(entry)
    values = args if kind in ("choice", "grid") else [entry] if kind == "fixed" else args
    for value in values:
        raw = copy.deepcopy(base)
        set_key(raw, key, value, "space.")
        problems = [p.removeprefix(f"{key}: ") for p in field_problems(raw, key)]
        if problems:
            raise ConfigError(f"space.{key}: {'; '.join(problems)}")


def trial_config(base: dict, params: dict[str, Any]) -> tuple[RaylmConfig | None, str | None]:
    """The base config tree with one trial's values: (config, None), or (None, why) for a
    combination that cannot train (the trial is pruned, the sweep goes on)."""
    raw = copy.deepcopy(base)
    for key, value in params.items():
        set_key(raw, key, value)
    try:
        return validate(raw, "trial"), None
    except ConfigError as err:
        return None, str(err).removeprefix("invalid config (trial): ")


def trial_steps(train_batch_tokens: int, flops_per_token: int, limit: LimitSection) -> int | None:
    """The optimizer steps a trial's token or FLOP budget buys (None: no such budget)."""
    tokens = [t for t in (limit.tokens, limit.flops / flops_per_token if limit.flops else None) if t]
    if not tokens:
        return None
    return max(1, math.floor(min(tokens) / train_batch_tokens))
