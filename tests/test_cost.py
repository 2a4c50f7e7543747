"""MFU, cost, budgets and the pre-launch estimate (pipelines/train/cost.py, `raylm cost`), by hand."""

import subprocess
import sys

import pytest

from raylm.cli import main
from raylm.config import TrainSection, load_config
from raylm.errors import ConfigError
from raylm.models.config import flops_per_token, param_counts, planned_model
from raylm.pipelines.train.cost import (
    EXPECTED_MFU,
    PEAK_FLOPS,
    PRICES,
    CostMeter,
    Hardware,
    budget_reason,
    detect_hardware,
    estimate,
    gpu_name,
    load_prices,
    measured_matmul_flops,
    planned_tokens,
    quote,
)
from tests.conftest import REPO

GPT2 = str(REPO / "configs" / "gpt2-124m.yaml")


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
    assert hw.name == "cpu" and hw.units == 2 and hw.price_per_hour == PRICES["cpu"].on_demand
    assert 1e8 < hw.peak_flops < 1e13  # a real measurement of a core, not a constant
    assert detect_hardware(False, 2, 1.0, price_override=0.5).price_per_hour == 0.5
    assert (
        detect_hardware(False, 2, 1.0, price_override=0.0).price_per_hour == 0.0
    )  # owned hardware: free, not the table


def test_matmul_peak_is_positive_and_repeatable_in_order_of_magnitude():
    a, b = measured_matmul_flops(seconds=0.1), measured_matmul_flops(seconds=0.1)
    assert a > 0 and 0.1 < a / b < 10


@pytest.mark.parametrize(
    "args, expected",
    [
        ((1000, 10.0, 1.0, 1000, None, None), "train.max_tokens=1,000 reached"),
        ((999, 10.0, 1.0, 1000, None, None), None),
        ((0, 7200.0, None, None, 2.0, None), "train.max_hours=2 reached"),
        ((0, 10.0, 5.0, None, None, 5.0), "train.max_usd=5 reached"),
        ((0, 10.0, None, None, None, 5.0), None),  # no price: a dollar budget cannot be spent
    ],
)
def test_budget_reason(args, expected):
    reason = budget_reason(*args)
    assert (reason is None) if expected is None else reason.startswith(expected)


def gpt2_plan():
    cfg = load_config(GPT2, [])
    model = planned_model(cfg.model, cfg.tokenizer.vocab_size)
    return model, flops_per_token(model, cfg.data.seq_len), planned_tokens(cfg.train, cfg.data.seq_len)


def test_gpt2_124m_on_8_h100_by_hand():
    model, fpt, tokens = gpt2_plan()
    d, layers, vocab, seq = 768, 12, 50304, 1024  # 50257 padded to a multiple of 64
    non_embedding = layers * (4 * d * d + 3 * d * 2048 + 2 * d) + d  # attention, SwiGLU (2048 wide), norms
    assert model.vocab_size == vocab
    assert param_counts(model) == {"total": non_embedding + vocab * d, "non_embedding": non_embedding}
    assert param_counts(model)["total"] == 123_587_328
    assert fpt == 6 * (non_embedding + vocab * d) + 12 * layers * 12 * 64 * seq == 854_770_176
    assert tokens == 19_073 * 512 * 1024
    e = estimate(fpt, tokens, 989e12, 8, 0.4, 2.99)
    hours = fpt * tokens / (8 * 989e12 * 0.4) / 3600
    assert e.flops == pytest.approx(fpt * tokens) and e.hours == pytest.approx(hours)
    assert e.unit_hours == pytest.approx(8 * hours) and e.usd == pytest.approx(8 * hours * 2.99)
    assert e.tokens_per_s == pytest.approx(tokens / (hours * 3600))
    assert (round(e.hours, 3), round(e.usd, 2)) == (0.75, 17.95)  # the by-hand cross-check: 45 min, $17.95


def test_constant_mfu_makes_cost_independent_of_cluster_size():
    _, fpt, tokens = gpt2_plan()
    small, large = (estimate(fpt, tokens, PEAK_FLOPS["H100"], n, EXPECTED_MFU, 2.99) for n in (8, 512))
    assert large.hours == pytest.approx(small.hours * 8 / 512) and large.usd == pytest.approx(small.usd)


def test_max_tokens_ends_the_plan_at_the_first_step_reaching_it():
    assert planned_tokens(TrainSection(max_steps=100, batch_size=4), 64) == 100 * 256
    assert planned_tokens(TrainSection(max_steps=100, batch_size=4, max_tokens=1000), 64) == 4 * 256
    assert planned_tokens(TrainSection(max_steps=3, batch_size=4, max_tokens=10**9), 64) == 3 * 256


def test_planned_model_is_the_model_training_builds():
    from raylm.pipelines.train.pretrain import build_model_config

    cfg = load_config(GPT2, [])
    assert planned_model(cfg.model, 50257) == build_model_config(cfg.model, 50257)
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        build_model_config(load_config(GPT2, ["model.vocab_size=50000"]).model, 50257)


def test_spot_is_cheaper_than_on_demand_and_every_figure_has_a_source():
    for name, price in PRICES.items():
        assert 0 < price.spot < price.on_demand, name
        assert "2025" in price.on_demand_source and "2025" in price.spot_source, name
    assert quote("H100", spot=True)[0] < quote("H100", spot=False)[0]


def test_unknown_gpu_lists_the_known_ones():
    assert gpu_name("h100") == "H100"
    with pytest.raises(ConfigError, match="unknown GPU 'B200'.*H100.*A100"):
        gpu_name("B200")
    with pytest.raises(ConfigError, match="no on-demand price known for H200"):
        quote("H200", spot=False)


def test_price_file_overrides_one_column_and_keeps_the_rest(tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text("h100: {spot: 1.5}\nH200: {on_demand: 3.5}\n")
    prices = load_prices(path)
    assert prices["H100"].spot == 1.5 and prices["H100"].spot_source == str(path)
    assert prices["H100"].on_demand == PRICES["H100"].on_demand and prices["H200"].on_demand == 3.5
    assert PRICES["H100"].spot != 1.5  # the table itself is left alone
    for bad in ("H100: {spot: -1}", "H100: {reserved: 1.0}", "B200: {spot: 1.0}", "[1, 2]"):
        path.write_text(bad)
        with pytest.raises(ConfigError, match="--prices|unknown GPU"):
            load_prices(path)


def test_meter_estimate_is_the_pre_launch_estimate():
    meter = CostMeter(
        Hardware("H100", 8, 989e12, 2.99), flops_per_token=854_770_176, tokens_per_step=524_288, max_steps=10
    )
    assert meter.estimate(10**9) == estimate(854_770_176, 10**9, 989e12, 8, EXPECTED_MFU, 2.99)
    assert CostMeter(Hardware("B300", 1, None, 5.0), 100, 10, 10).estimate(100) is None


def test_cli_prints_the_estimate_and_a_table_of_sizes(capsys):
    assert main(["cost", "--config", GPT2, "--gpu", "H100", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "854,770,176" in out and "9,999,745,024" in out and "40% MFU" in out and "on-demand: Lambda" in out
    assert "8 x H100: 3,702,516 tokens/s, 45.0 min to train, 6.00 GPU-hours, $17.95" in out
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 8, 64, 512] and all("$17.95" in r for r in rows)
    assert "<- this run" in out and "linear scaling" in out


def test_cli_prices_spot_a_price_file_and_the_config(capsys, tmp_path):
    assert main(["cost", GPT2, "--gpus", "8", "--spot"]) == 0
    assert "spot: Google Cloud" in capsys.readouterr().out
    (tmp_path / "p.yaml").write_text("H100: {on_demand: 2.0}\n")
    assert main(["cost", GPT2, "--prices", str(tmp_path / "p.yaml")]) == 0
    assert "$12.00" in capsys.readouterr().out  # 6.00 GPU-hours x $2
    assert main(["cost", GPT2, "--set", "scaling.price_per_hour=1.0"]) == 0
    assert "(scaling.price_per_hour)" in capsys.readouterr().out
    assert main(["cost", GPT2, "--gpu", "B200"]) == 2
    assert "unknown GPU 'B200'" in capsys.readouterr().err


def test_cli_cost_starts_neither_ray_nor_torch():
    code = (
        "import sys; from raylm.cli import main; main(['cost']); "
        "sys.exit(sorted({'ray', 'torch'} & set(sys.modules)) or 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
