"""What training costs and how well it uses the hardware: MFU and dollars.

MFU = FLOPs per token (models/config.py: 6N + 12·L·H·Q·T) x tokens/s / peak FLOP/s of the
whole worker group. GPU peaks are dense bf16 from the vendors' datasheets; on CPU the peak is
a matmul measured in the worker at start-up, since no datasheet number fits a shared core.
Cost = elapsed training time x units (GPUs, or CPU cores) x price per unit-hour.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Dense bf16 tensor-core peak per GPU, FLOP/s (NVIDIA datasheets; sparsity doubles them, and
# is not counted). Matched by substring of torch.cuda.get_device_name().
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}

# Default on-demand prices per unit-hour in USD, as listed when written (2025): Lambda's
# on-demand H100 SXM and A100 80GB SXM list prices, and AWS us-east-1 c7i.large ($0.08925/h
# for 2 vCPUs) per CPU core. Prices move: set scaling.price_per_hour for your contract.
PRICE_PER_HOUR = {"H100": 2.99, "A100": 1.79, "cpu": 0.0446}


@dataclass
class Hardware:
    name: str  # a PEAK_FLOPS key, "cpu", or the raw device name when unknown
    units: float  # GPUs, or CPU cores, of the whole worker group
    peak_flops: float | None  # per unit; None: unknown, no MFU
    price_per_hour: float | None  # per unit; None: unknown, no cost


def detect_hardware(use_gpu: bool, world: int, cpus_per_worker: float, price_override: float | None) -> Hardware:
    """This worker's device, assumed the same on every worker (Ray Train schedules one kind)."""
    if use_gpu and torch.cuda.is_available():
        device = torch.cuda.get_device_name()
        name = next((k for k in PEAK_FLOPS if k in device), device)
        return Hardware(name, world, PEAK_FLOPS.get(name), price_override or PRICE_PER_HOUR.get(name))
    units = world * cpus_per_worker
    return Hardware("cpu", units, measured_matmul_flops() / cpus_per_worker, price_override or PRICE_PER_HOUR["cpu"])


def measured_matmul_flops(n: int = 512, seconds: float = 0.3) -> float:
    """FLOP/s of repeated n x n fp32 matmuls with this process' torch threads: the best a
    training step on these cores could do."""
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
        self.hw, self.flops_per_token, self.tokens_per_step, self.max_steps = hw, flops_per_token, tokens_per_step, max_steps

    def usd(self, train_seconds: float) -> float | None:
        if self.hw.price_per_hour is None:
            return None
        return train_seconds / 3600 * self.hw.units * self.hw.price_per_hour

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


def budget_reason(step_tokens: int, seconds: float, usd: float | None, max_tokens: int | None,
                  max_hours: float | None, max_usd: float | None) -> str | None:
    """Why training must stop now (a budget in the train section is spent), or None."""
    if max_tokens and step_tokens >= max_tokens:
        return f"train.max_tokens={max_tokens:,} reached ({step_tokens:,} tokens)"
    if max_hours and seconds >= max_hours * 3600:
        return f"train.max_hours={max_hours:g} reached ({seconds / 3600:.3f} h)"
    if max_usd and usd is not None and usd >= max_usd:
        return f"train.max_usd={max_usd:g} reached (${usd:.2f})"
    return None
