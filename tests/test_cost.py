"""MFU, cost and budgets (pipelines/cost.py), by hand."""

import pytest

from raylm.pipelines.cost import PRICE_PER_HOUR, CostMeter, Hardware, budget_reason, detect_hardware, measured_matmul_flops


def test_meter_by_hand():
    hw = Hardware("H100", units=8, peak_flops=989e12, price_per_hour=2.0)
    meter = CostMeter(hw, flops_per_token=6 * 124_000_000, tokens_per_step=524_288, max_steps=1000)
    m = meter.metrics(step=100, train_seconds=1800, tokens_per_s=1_000_000)
    assert m["accelerator_hours"] == pytest.approx(4.0)  # half an hour on 8 GPUs
    assert m["mfu"] == pytest.approx(6 * 124e6 * 1e6 / (989e12 * 8))
    assert m["cost_usd"] == pytest.approx(8.0)
    assert m["usd_per_million_tokens"] == pytest.approx(8.0 / (100 * 524_288) * 1e6)
    assert m["projected_usd"] == pytest.approx(80.0)


def test_unknown_price_gives_no_cost_but_still_mfu():
    meter = CostMeter(Hardware("B300", 1, 1e15, None), 100, 10, 10)
    m = meter.metrics(1, 60, 1000)
    assert "cost_usd" not in m and meter.usd(60) is None and m["mfu"] == pytest.approx(1e5 / 1e15)


def test_cpu_hardware_is_measured_and_priced_per_core():
    hw = detect_hardware(use_gpu=False, world=2, cpus_per_worker=1.0, price_override=None)
    assert hw.name == "cpu" and hw.units == 2 and hw.price_per_hour == PRICE_PER_HOUR["cpu"]
    assert 1e8 < hw.peak_flops < 1e13  # a real measurement of a core, not a constant
    assert detect_hardware(False, 2, 1.0, price_override=0.5).price_per_hour == 0.5


def test_matmul_peak_is_positive_and_repeatable_in_order_of_magnitude():
    a, b = measured_matmul_flops(seconds=0.1), measured_matmul_flops(seconds=0.1)
    assert a > 0 and 0.1 < a / b < 10


@pytest.mark.parametrize("args, expected", [
    ((1000, 10.0, 1.0, 1000, None, None), "train.max_tokens=1,000 reached"),
    ((999, 10.0, 1.0, 1000, None, None), None),
    ((0, 7200.0, None, None, 2.0, None), "train.max_hours=2 reached"),
    ((0, 10.0, 5.0, None, None, 5.0), "train.max_usd=5 reached"),
    ((0, 10.0, None, None, None, 5.0), None),  # no price: a dollar budget cannot be spent
])
def test_budget_reason(args, expected):
    reason = budget_reason(*args)
    assert (reason is None) if expected is None else reason.startswith(expected)
