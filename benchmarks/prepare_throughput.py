"""Prepare throughput (tokens/s) of raylm against two baselines, side by side, medians of N runs.

    (a) limit: one process reads the files and calls the same tokenizer's encode_batch, then
        packs windows of seq_len + 1 with numpy (no cleaning, no dedup, no Parquet); (a') the
        same with encode_batch_fast, which raylm uses (it skips character offsets);
    (b) peer:  Hugging Face `datasets`, Dataset.map(batched=True, num_proc=2) with the same
        tokenizer and packing, from the same files;
    raylm:     `prepare` end to end on Ray Data, once with the pipeline's defaults (cleaning,
        exact + MinHash dedup, BPE training) and once as the baselines do it (cleaning and
        dedup off, the tokenizer given).

Ray's start-up is measured and reported separately, not counted in any run. For each raylm row,
the CPU that Ray's own processes (raylet, GCS, dashboard and its agents, log monitor) spent
during its runs is printed in cores: on 2 cores that CPU comes out of the pipeline's.
Usage: python benchmarks/prepare_throughput.py [--runs 3] [--data ../shared/data] [--smoke]
Needs: pip install -e '.[bench]' (Hugging Face datasets)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from itertools import chain
from pathlib import Path

import numpy as np

SEQ_LEN = 256
VOCAB = 8192


def corpus_files(data: Path) -> list[Path]:
    return [
        data / "tinyshakespeare" / "input.txt",
        *sorted((data / "gutenberg").glob("*.txt")),
        *sorted((data / "tinystories").glob("*.txt")),
    ]


def paragraphs(files: list[Path]) -> list[str]:
    return [p for f in files for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def pack(ids: list[list[int]], eos: int, width: int) -> np.ndarray:
    stream = np.fromiter(chain.from_iterable(x + [eos] for x in ids), dtype=np.int32)
    n = len(stream) // width
    return stream[: n * width].reshape(n, width)


def run_limit(files: list[Path], tokenizer_path: Path, fast: bool = False) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    encodings = encode(paragraphs(files), add_special_tokens=False)
    return pack([e.ids for e in encodings], 0, SEQ_LEN + 1).size


def run_datasets(files: list[Path], tokenizer_path: Path) -> int:
    import datasets
    from tokenizers import Tokenizer

    datasets.disable_progress_bars()

    def tokenize_and_pack(batch):
        tok = Tokenizer.from_file(str(tokenizer_path))  # per process: HF's map forks workers
        windows = pack([e.ids for e in tok.encode_batch(batch["text"], add_special_tokens=False)], 0, SEQ_LEN + 1)
        return {"tokens": windows.tolist()}

    ds = datasets.Dataset.from_dict({"text": paragraphs(files)})
    out = ds.map(tokenize_and_pack, batched=True, batch_size=1000, num_proc=2, remove_columns=["text"])
    return len(out) * (SEQ_LEN + 1)


def run_raylm(files: list[Path], tokenizer_path: Path | None, baseline_like: bool) -> int:
    from raylm.config import load_config
    from raylm.pipelines.data.prepare import prepare

    overrides = [
        f"data.sources=[{{paths: {json.dumps([str(f) for f in files])}}}]",
        f"data.seq_len={SEQ_LEN}",
        f"tokenizer.vocab_size={VOCAB}",
        "data.val_fraction=0.01",
        "model.block_size=256",
    ]
    if baseline_like:
        overrides += [
            "data.dedup.exact=false",
            "data.dedup.near=false",
            "data.clean.normalize=false",
            "data.clean.scrub_pii=false",
            "data.clean.strip_boilerplate=false",
            f"tokenizer.path={tokenizer_path}",
        ]
    cfg = load_config(None, overrides)
    out = Path(tempfile.mkdtemp(prefix="raylm-bench-"))
    try:
        manifest = prepare(cfg.data, cfg.tokenizer, out)
        return sum(s.tokens for s in manifest.splits.values())
    finally:
        shutil.rmtree(out, ignore_errors=True)


def timed(fn, runs: int) -> tuple[float, int]:
    seconds, tokens = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        tokens = fn()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), tokens


RAY_SYSTEM = ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "ray/_private/monitor")


def ray_system_cpu() -> dict[int, float]:
    """CPU seconds so far of each of Ray's own processes (not its workers, which run the pipeline)."""
    import psutil

    seconds = {}
    for proc in psutil.process_iter(["cmdline"]):
        command = " ".join(proc.info["cmdline"] or [])
        if command.startswith("ray::") or not any(name in command for name in RAY_SYSTEM):
            continue
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        seconds[proc.pid] = times.user + times.system
    return seconds


def timed_with_ray_share(fn, runs: int) -> tuple[float, int, float]:
    """timed(), plus the cores Ray's own processes used over all the runs."""
    before, t0 = ray_system_cpu(), time.perf_counter()
    median, tokens = timed(fn, runs)
    wall, after = time.perf_counter() - t0, ray_system_cpu()
    return median, tokens, sum(after[pid] - before.get(pid, 0.0) for pid in after) / wall


def train_reference_tokenizer(files: list[Path], path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(paragraphs(files), trainer=trainer)
    tok.save(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--smoke", action="store_true", help="one run on tinyshakespeare alone: check that it runs")
    args = parser.parse_args()
    files = corpus_files(args.data)
    if args.smoke:
        args.runs, files = 1, files[:1]  # 1.1 MB instead of ~30 MB
    mib = sum(f.stat().st_size for f in files) / 2**20
    tok_path = Path(tempfile.mkdtemp()) / "tokenizer.json"
    train_reference_tokenizer(files, tok_path)

    import ray

    from raylm.pipelines.runtime import start_ray

    t0 = time.perf_counter()
    start_ray()
    startup = time.perf_counter() - t0

    results = {
        "(a) limit: encode_batch, one process": timed(lambda: run_limit(files, tok_path), args.runs),
        "(a') encode_batch_fast (no offsets), one process": timed(
            lambda: run_limit(files, tok_path, fast=True), args.runs
        ),
        "(b) HF datasets map, num_proc=2": timed(lambda: run_datasets(files, tok_path), args.runs),
        "raylm prepare, as the baselines (no clean/dedup, tokenizer given)": timed_with_ray_share(
            lambda: run_raylm(files, tok_path, baseline_like=True), args.runs
        ),
        "raylm prepare, defaults (clean, dedup, BPE training)": timed_with_ray_share(
            lambda: run_raylm(files, None, baseline_like=False), args.runs
        ),
    }
    ray.shutdown()
    limit = results["(a) limit: encode_batch, one process"][:2]
    peer = results["(b) HF datasets map, num_proc=2"][:2]
    print(
        f"\ncorpus: {len(files)} files, {mib:.1f} MiB; seq_len {SEQ_LEN}; vocab {VOCAB}; "
        f"median of {args.runs} runs; Ray start-up {startup:.1f} s (not counted)"
    )
    print(f"{'run':66} {'seconds':>8} {'tokens/s':>12} {'vs (a)':>7} {'vs (b)':>7} {'Ray own':>8}")
    for name, (sec, tokens, *ray_cores) in results.items():
        rate = tokens / sec
        ray_share = f"{ray_cores[0]:5.2f} cores" if ray_cores else ""
        print(
            f"{name:66} {sec:8.2f} {rate:12,.0f} "
            f"{rate / (limit[1] / limit[0]):6.2f}x {rate / (peer[1] / peer[0]):6.2f}x {ray_share}"
        )


if __name__ == "__main__":
    main()
