"""`raylm cost`: FLOPs, time to train and dollars of a config before launch, from the config and
the model's arithmetic alone (pipelines/train/cost.py): no Ray, no torch."""

from __future__ import annotations

import argparse

from raylm.cli.common import Command, config_args, resolve_config
from raylm.config import RaylmConfig
from raylm.errors import ConfigError
from raylm.fmt import duration, money


def cost_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument(
        "--gpu", help="GPU type, priced and peaked in pipelines/train/cost.py (default: cluster.gpu.type, H100)"
    )
    p.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="GPUs of the run (default: scaling.num_workers if scaling.use_gpu, else 8)",
    )
    p.add_argument(
        "--mfu", type=float, default=None, metavar="F", help="expected model FLOPs utilization (default 0.40)"
    )
    p.add_argument("--spot", action="store_true", help="price at the spot column (default: cluster.gpu.spot)")
    p.add_argument("--price", type=float, metavar="USD", help="USD per GPU-hour, over every table and the config")
    p.add_argument("--prices", metavar="YAML", help="a price file over the table: {H100: {on_demand: 2.49, spot: 1.8}}")


def cmd_cost(args: argparse.Namespace) -> int:
    from functools import partial

    from raylm.models.config import flops_per_token, planned_model
    from raylm.pipelines.train.cost import PEAK_FLOPS, estimate, planned_tokens

    cfg = resolve_config(args)  # pydantic, yaml and the model's arithmetic: no Ray, no torch
    gpu, gpus, mfu = hardware(args, cfg)
    args.spot = args.spot or cfg.cluster.gpu.spot  # what `raylm cluster render` would schedule on
    model = planned_model(cfg.model, cfg.tokenizer.vocab_size)
    fpt, tokens = flops_per_token(model, cfg.data.seq_len), planned_tokens(cfg.train, cfg.data.seq_len)
    price, source = price_of(args, cfg, gpu)
    plan = partial(estimate, fpt, tokens, PEAK_FLOPS[gpu], mfu=mfu, price_per_hour=price)  # plan(gpus)
    lines = [
        f"raylm cost '{cfg.run.name}': an estimate before launch",
        *work_lines(cfg, model, fpt, tokens),
        f"  assumes      {PEAK_FLOPS[gpu] / 1e12:,.0f} TFLOP/s dense bf16 peak per {gpu} at {mfu:.0%} MFU; "
        f"{money(price)} per GPU-hour ({source})",
        *estimate_lines(plan(gpus), gpus, gpu, cfg.train.max_usd),
    ]
    print("\n".join(lines + [""] + size_table(plan, gpus, cfg.train.batch_size)))
    return 0


def hardware(args: argparse.Namespace, cfg: RaylmConfig) -> tuple[str, int, float]:
    """The GPU type, how many and the expected MFU: the flags, else the config's."""
    from raylm.pipelines.train.cost import EXPECTED_MFU, gpu_name

    gpu, mfu = gpu_name(args.gpu or cfg.cluster.gpu.type), EXPECTED_MFU if args.mfu is None else args.mfu
    gpus = args.gpus if args.gpus is not None else cfg.scaling.num_workers if cfg.scaling.use_gpu else 8
    if gpus < 1 or not 0 < mfu <= 1 or (args.price is not None and args.price < 0):
        raise ConfigError("cost: --gpus must be >= 1, --mfu in (0, 1] and --price >= 0")
    return gpu, gpus, mfu


def price_of(args: argparse.Namespace, cfg: RaylmConfig, gpu: str) -> tuple[float, str]:
    """--price wins; --spot or --prices ask for the table's column; else scaling.price_per_hour
    if set, else the table's on-demand column: what training would charge."""
    from raylm.pipelines.train.cost import PRICES, load_prices, quote

    if args.price is not None:
        return args.price, "--price"
    if cfg.scaling.price_per_hour is not None and not (args.spot or args.prices):
        return cfg.scaling.price_per_hour, "scaling.price_per_hour"
    usd, source = quote(gpu, args.spot, load_prices(args.prices) if args.prices else PRICES)
    return usd, f"{'spot' if args.spot else 'on-demand'}: {source}"


def work_lines(cfg: RaylmConfig, model, fpt: int, tokens: int) -> list[str]:
    """The run's size, each figure with what it is made of, to check by hand."""
    from raylm.models.config import param_counts

    counts, seq_len = param_counts(model), cfg.data.seq_len
    matmul = counts["non_embedding"] + model.vocab_size * model.n_embd  # flops_per_token's N: the output head counts
    vocab = (
        "model.vocab_size"
        if cfg.model.vocab_size
        else f"tokenizer.vocab_size {cfg.tokenizer.vocab_size:,} padded to 64"
    )
    steps = tokens // (cfg.train.batch_size * seq_len)
    capped = " (train.max_tokens ends it before max_steps)" if steps < cfg.train.max_steps else ""
    return [
        f"  model        {counts['total']:,} parameters ({counts['non_embedding']:,} non-embedding; "
        f"vocab {model.vocab_size:,} = {vocab})",
        f"  FLOPs/token  {fpt:,} = 6 x {matmul:,} matmul weights + {fpt - 6 * matmul:,} attention "
        f"at seq_len {seq_len:,}",
        f"  tokens       {tokens:,} = {steps:,} steps x {cfg.train.batch_size:,} sequences "
        f"x {seq_len:,} tokens{capped}",
        f"  compute      {fpt * tokens:.4g} FLOPs",
    ]


def estimate_lines(mine, gpus: int, gpu: str, max_usd: float | None) -> list[str]:
    """This run's estimate, and its share of train.max_usd if set."""
    lines = [
        f"  estimate     {gpus} x {gpu}: {mine.tokens_per_s:,.0f} tokens/s, {duration(mine.hours * 3600)} to train, "
        f"{gpu_hours(mine.unit_hours)} GPU-hours, {money(mine.usd)}"
    ]
    if max_usd:
        lines.append(f"  budget       train.max_usd {money(max_usd)}: the estimate is {mine.usd / max_usd:.1%} of it")
    return lines


def size_table(plan, gpus: int, batch_size: int) -> list[str]:
    """Time to train and cost at a few sizes, with each GPU's share of the global batch (data
    parallelism needs at least one sequence per GPU, so larger sizes are left out)."""
    rows = [f"  {'GPUs':>5} {'seqs/GPU':>9} {'tokens/s':>14} {'time to train':>14} {'GPU-hours':>10} {'cost':>12}"]
    for n in sorted({n for n in (1, 8, 64, 512) if n <= batch_size} | {gpus}):
        e = plan(n)
        rows.append(
            f"  {n:>5} {batch_size / n:>9.4g} {e.tokens_per_s:>14,.0f} {duration(e.hours * 3600):>14} "
            f"{gpu_hours(e.unit_hours):>10} {money(e.usd):>12}" + ("  <- this run" if n == gpus else "")
        )
    return rows + [
        "  Constant MFU, i.e. linear scaling: GPU-hours and cost are the same at every size. In practice",
        "  MFU drops as GPUs are added (communication, fewer sequences per GPU), so large sizes take",
        "  longer and cost more than shown; measure a few hundred steps at the size you mean to use.",
    ]


def gpu_hours(hours: float) -> str:
    return f"{hours:,.2f}" if hours >= 0.01 else f"{hours:.2g}"


COMMAND = Command(
    "cost",
    "estimate a run before launch: FLOPs, time to train and dollars on a few cluster sizes (no Ray)",
    cost_args,
    cmd_cost,
)
