"""Learning benchmark: tinyshakespeare trained from scratch by `raylm run configs/shakespeare.yaml`
on 2 CPU workers; validation loss in nats per character on the last 10% of the text (the split
nanoGPT's shakespeare_char uses) against training wall time.

The anchor is nanoGPT's CPU config for the same data (4 layers, 128 wide, 64-character context,
2000 iterations), which reaches 1.886 nats/char in about 214 s on this kind of machine
(measured when this benchmark was added, commit 6cb7a1d; nanoGPT's README reports 1.88 in about
3 minutes). The target: that loss in half the time, or a lower one in the same time.

nats/char = raylm's validation bits per byte x ln 2: the text is ASCII, one byte per character.
raylm predicts BPE tokens, and a token's loss is spread over the characters it covers, so the
figure compares across tokenizers (pipelines/eval/scoring.py).

Usage: python benchmarks/learn_shakespeare.py [--work DIR] [--set KEY=VALUE ...] [--smoke]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
NANOGPT = (1.886, 214.0)  # nats/char, seconds
# --smoke: the same pipeline at a size that checks the script, not the model (~30 s).
SMOKE = [
    "model.n_layer=1",
    "tokenizer.vocab_size=300",
    "train.max_steps=10",
    "train.eval_interval=5",
    "train.checkpoint_interval=10",
    "eval.sample_tokens=8",
]


def split_text(work: Path) -> None:
    """First 90% of the characters to train on, the last 10% to validate on (nanoGPT's cut)."""
    text = TEXT.read_text()
    cut = int(len(text) * 0.9)
    (work / "shakespeare").mkdir(parents=True, exist_ok=True)
    (work / "shakespeare" / "train.txt").write_text(text[:cut])
    (work / "shakespeare" / "val.txt").write_text(text[cut:])


def run(work: Path, overrides: list[str]) -> float:
    args = [
        sys.executable,
        "-m",
        "raylm",
        "run",
        str(REPO / "configs" / "shakespeare.yaml"),
        "--set",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
    ]
    args += [x for o in overrides for x in ("--set", o)]
    started = time.perf_counter()
    subprocess.run(args, check=True, cwd=work)
    return time.perf_counter() - started


def curve(work: Path, name: str) -> list[tuple[int, float, float]]:
    """(step, training seconds, validation nats/char) at each evaluation of the run."""
    from mlflow.tracking import MlflowClient

    from raylm.pipelines.track.runs import latest_run

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run = latest_run(client, "raylm", name, "run")
    history = lambda key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}  # noqa: E731
    bpb, seconds = history("val_bits_per_byte"), history("train_seconds")
    return [(step, seconds[step], bpb[step] * math.log(2)) for step in sorted(bpb)]


def time_to_reach(points: list[tuple[int, float, float]], target: float) -> float | None:
    return next((s for _, s, loss in points if loss <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--smoke", action="store_true", help="a 1-layer model for 10 steps: check that the script runs")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="raylm-shakespeare-"))
    split_text(work)
    overrides = SMOKE + args.set if args.smoke else args.set
    wall = run(work, overrides)
    name = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("run.name=")), "shakespeare")
    points = curve(work, name)
    print(f"\ntinyshakespeare, last 10% as validation, 2 CPU workers (raylm run: {wall:.0f} s wall in all)")
    print(f"{'step':>6} {'train s':>8} {'val nats/char':>14}")
    for step, seconds, loss in points:
        print(f"{step:6d} {seconds:8.1f} {loss:14.4f}")
    reach = time_to_reach(points, NANOGPT[0])
    _, last_s, last_loss = points[-1]
    print(f"nanoGPT CPU config: {NANOGPT[0]} nats/char in {NANOGPT[1]:.0f} s")
    if reach is None:
        print(f"raylm: never reached {NANOGPT[0]}; best {min(p[2] for p in points):.4f}")
    else:
        print(f"raylm: {NANOGPT[0]} reached after {reach:.0f} s of training = {reach / NANOGPT[1]:.2f}x nanoGPT's time")
    print(f"raylm: {last_loss:.4f} nats/char after {last_s:.0f} s of training")


if __name__ == "__main__":
    main()
