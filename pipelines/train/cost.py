"""What training costs and how well it uses the hardware: MFU and dollars, measured during a
run (CostMeter) and estimated before one (`estimate`, behind `raylm cost`).

MFU = FLOPs per token (models/config.py: 6N + 12·L·H·Q·T) x tokens/s / peak FLOP/s of the
whole worker group. GPU peaks are dense bf16 from the vendors' datasheets; on CPU the peak is
a matmul measured in the worker at start-up, since no datasheet number fits a shared core.
Cost = elapsed training time x units (GPUs, or CPU cores) x price per unit-hour.

torch is imported on first use only: `raylm cost` prices a run in well under a second, and
importing torch alone takes ~4 s on 2 cores.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from raylm.config import TrainSection
from raylm.errors import ConfigError

# Dense bf16 tensor-core peak per GPU, FLOP/s (NVIDIA datasheets; sparsity doubles them, and
# is not counted). Matched by substring of torch.cuda.get_device_name().
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}

# The MFU a pre-launch estimate assumes. Published H100 bf16 figures (each project's own): llm.c
# reaches ~40% on GPT-2 124M at seq 1024; llm-foundry 35-40% at 760M and 42% at 1B (FSDP);
# torchtitan 33-39% at 8B. A first run of a new setup often lands below this.
EXPECTED_MFU = 0.40


@dataclass(frozen=True)
class Price:
    """USD per unit-hour (a GPU, or one CPU core) in two columns, and where each comes from."""

    on_demand: float | None
    spot: float | None
    on_demand_source: str
    spot_source: str


# List prices as known when written, without network access to re-check them: verify before
# budgeting, and set scaling.price_per_hour (training) or --price / --prices (`raylm cost`).
# On-demand: Lambda's 2025 list prices for 8-GPU H100 SXM ($2.99) and A100 80GB SXM ($1.79)
# instances, per GPU; AWS us-east-1 c7i.large on-demand ($0.08925/h for 2 vCPUs) per core.
# Spot: Lambda sells none, so these are Google Cloud Spot VM GPU prices (us-central1, 2025;
# Google revises them up to monthly) as recalled, not re-checked: treat as +-25%. CPU spot: AWS
# c7i.large spot in us-east-1 hovered ~60% below on-demand in 2025 ($0.036/h per 2 vCPUs),
# also recalled; AWS spot prices move hourly. Spot instances can be reclaimed at short notice:
# raylm's checkpoints and `scaling.max_failures` resume such a run, at the cost of the steps
# since the last checkpoint.
GCP_SPOT = "Google Cloud Spot, us-central1, 2025, recalled"
PRICES = {
    "H100": Price(2.99, 2.25, "Lambda on-demand list, H100 SXM, 2025", GCP_SPOT),
    "A100": Price(1.79, 1.57, "Lambda on-demand list, A100 80GB SXM, 2025", GCP_SPOT),
    "cpu": Price(
        0.0446,
        0.018,
        "AWS c7i.large on-demand per core, us-east-1, 2025",
        "AWS c7i.large spot per core, us-east-1, 2025, recalled",
    ),
}


def gpu_name(name: str) -> str:
    """The PEAK_FLOPS key for a GPU a user names ("h100" -> "H100")."""
    match = next((k for k in PEAK_FLOPS if k.lower() == name.lower()), None)
    if match is None:
        raise ConfigError(
            f"unknown GPU {name!r}: known are {', '.join(PEAK_FLOPS)} (bf16 peaks in pipelines/train/cost.py)"
        )
    return match


def load_prices(path: str | Path, prices: dict[str, Price] = PRICES) -> dict[str, Price]:
    """The table with a YAML file's figures over it, e.g. {H100: {on_demand: 2.49, spot: 1.8}};
    an entry may give one column, and the file's name becomes that figure's source."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prices: {path}: no such file")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--prices: {path} must map GPU names to {{on_demand: USD, spot: USD}}")
    merged = dict(prices)
    for name, columns in raw.items():
        key = "cpu" if str(name).lower() == "cpu" else gpu_name(str(name))
        merged[key] = _override(merged.get(key, Price(None, None, "", "")), columns, path, name)
    return merged


def _override(price: Price, columns, path: Path, name) -> Price:
    ok = (
        isinstance(columns, dict)
        and columns
        and set(columns) <= {"on_demand", "spot"}
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in columns.values())
    )
    if not ok:
        raise ConfigError(
            f"--prices: {path}: {name} must be {{on_demand: USD, spot: USD}} (either or both, >= 0), got {columns!r}"
        )
    sources = {f"{column}_source": str(path) for column in columns}
    return replace(price, **{k: float(v) for k, v in columns.items()}, **sources)


def quote(name: str, spot: bool, prices: dict[str, Price] = PRICES) -> tuple[float, str]:
    """A unit-hour price from one column of the table, and where it comes from."""
    price = prices.get(name)
    column = "spot" if spot else "on_demand"
    usd = getattr(price, column) if price else None
    if usd is None:
        raise ConfigError(f"no {column.replace('_', '-')} price known for {name}: pass --price USD or --prices FILE")
    return usd, getattr(price, f"{column}_source")


def on_demand_price(name: str) -> float | None:
    """What training charges by default: the on-demand column, or None if unlisted."""
    price = PRICES.get(name)
    return price.on_demand if price else None


@dataclass(frozen=True)
class Estimate:
    flops: float  # the whole run's training FLOPs
    tokens_per_s: float  # the whole group's, at the assumed MFU
    hours: float  # wall clock
    unit_hours: float  # GPU-hours (core-hours on CPU)
    usd: float | None  # None: no price known


def estimate(
    flops_per_token: int,
    tokens: int,
    peak_flops: float,
    units: float,
    mfu: float = EXPECTED_MFU,
    price_per_hour: float | None = None,
) -> Estimate:
    """Training `tokens` on `units` devices of `peak_flops` each, at `mfu`. A constant MFU means
    linear scaling: GPU-hours and dollars come out the same for any number of devices."""
    tokens_per_s = mfu * peak_flops * units / flops_per_token
    hours = tokens / tokens_per_s / 3600
    usd = None if price_per_hour is None else hours * units * price_per_hour
    return Estimate(float(flops_per_token) * tokens, tokens_per_s, hours, hours * units, usd)


def planned_tokens(train: TrainSection, seq_len: int) -> int:
    """The tokens a run trains on: max_steps global batches, or fewer if train.max_tokens
    stops it first (at the first step that reaches it, as budget_reason does)."""
    per_step = train.batch_size * seq_len
    steps = train.max_steps
    if train.max_tokens:
        steps = min(steps, math.ceil(train.max_tokens / per_step))
    return steps * per_step


@dataclass
class Hardware:
    name: str  # a PEAK_FLOPS key, "cpu", or the raw device name when unknown
    units: float  # GPUs, or CPU cores, of the whole worker group
    peak_flops: float | None  # per unit; None: unknown, no MFU
    price_per_hour: float | None  # per unit; None: unknown, no cost


def detect_hardware(use_gpu: bool, world: int, cpus_per_worker: float, price_override: float | None) -> Hardware:
    """This worker's device, assumed the same on every worker (Ray Train schedules one kind).
    Priced by scaling.price_per_hour if set (0 too: hardware already paid for), else on-demand."""
    import torch

    if use_gpu and torch.cuda.is_available():
        device = torch.cuda.get_device_name()
        name = next((k for k in PEAK_FLOPS if k in device), device)
        return Hardware(name, world, PEAK_FLOPS.get(name), _price(name, price_override))
    units = world * cpus_per_worker
    return Hardware("cpu", units, measured_matmul_flops() / cpus_per_worker, _price("cpu", price_override))


def _price(name: str, override: float | None) -> float | None:
    return override if override is not None else on_demand_price(name)


def measured_matmul_flops(n: int = 512, seconds: float = 0.3) -> float:
    """FLOP/s of repeated n x n fp32 matmuls with this process' torch threads: the best a
    training step on these cores could do."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool and caches
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


class CostMeter:
    """MFU, accelerator-hours and dollars from tokens/s and the training time so far."""

    def __init__(self, hw: Hardware, flops_per_token: int, tokens_per_step: int, max_steps: int):
        self.hw, self.flops_per_token, self.tokens_per_step, self.max_steps = (
            hw,
            flops_per_token,
            tokens_per_step,
            max_steps,
        )

    def usd(self, train_seconds: float) -> float | None:
        if self.hw.price_per_hour is None:
            return None
        return train_seconds / 3600 * self.hw.units * self.hw.price_per_hour

    def estimate(self, tokens: int) -> Estimate | None:
        """What `raylm cost` predicts for this hardware, at EXPECTED_MFU (None: no known peak)."""
        if not self.hw.peak_flops:
            return None
        hw = self.hw
        return estimate(self.flops_per_token, tokens, hw.peak_flops, hw.units, EXPECTED_MFU, hw.price_per_hour)

    def metrics(self, step: int, train_seconds: float, tokens_per_s: float) -> dict[str, float]:
        out = {"accelerator_hours": train_seconds / 3600 * self.hw.units}
        if self.hw.peak_flops:
            out["mfu"] = self.flops_per_token * tokens_per_s / (self.hw.peak_flops * self.hw.units)
        usd = self.usd(train_seconds)
        if usd is not None:
            out["cost_usd"] = usd
            out["usd_per_million_tokens"] = usd / max(1, step * self.tokens_per_step) * 1e6
            out["projected_usd"] = usd / max(1, step) * self.max_steps
        return out


def budget_reason(
    step_tokens: int,
    seconds: float,
    usd: float | None,
    max_tokens: int | None,
    max_hours: float | None,
    max_usd: float | None,
) -> str | None:
    """Why training must stop now (a budget in the train section is spent), or None."""
    if max_tokens and step_tokens >= max_tokens:
        return f"train.max_tokens={max_tokens:,} reached ({step_tokens:,} tokens)"
    if max_hours and seconds >= max_hours * 3600:
        return f"train.max_hours={max_hours:g} reached ({seconds / 3600:.3f} h)"
    if max_usd and usd is not None and usd >= max_usd:
        return f"train.max_usd={max_usd:g} reached (${usd:.2f})"
    return None
