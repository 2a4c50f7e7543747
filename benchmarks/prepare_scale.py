"""How `raylm prepare`'s memory and time grow with the corpus: a small and a 10x larger
synthetic corpus, prepared with the defaults (cleaning, exact + MinHash dedup, BPE training).

Each size runs in a process of its own, with its own local Ray, so each size's peaks are its own:
    driver   peak private RSS of the process that calls prepare(), Ray's start included;
    worker   the largest peak private RSS of Ray's worker processes (`ray::...`), with the
             task it was running at its peak;
    store    the most of Ray's shared-memory object store in use, for reference: its size is
             fixed when Ray starts (30% of RAM by default) and Ray spills to disk beyond it;
    rank     a training rank's peak RSS: a child opens the train split as a rank does and
             reads 20 micro-batches of 8 windows;
    tokens/s packed tokens over prepare()'s wall time (Ray's start not counted).
Private RSS is RssAnon + RssFile from /proc/<pid>/status, sampled every 0.25 s: a worker's
VmHWM also counts the object-store pages it has mapped (RssShmem), which are shared by every
worker and the driver; one spill worker showed 7.0 GB of VmHWM, 6.9 GB of it the store.

The corpus: .jsonl.zst files of ~400-byte documents, words drawn Zipf-like from a 30k-word
synthetic vocabulary, with planted duplicates (3% exact copies, 3% copies with two words
changed) so that both dedup stages do work. It is written once per size under --work.

Usage: python benchmarks/prepare_scale.py [--small-mb 200] [--factor 10] [--work DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DOCS_PER_FILE = 50_000  # ~20 MB of text per file
RESULT = "[scale result] "
RANK = """
import sys
from raylm.pipelines.data.loader import WindowLoader, WindowStore
peak = lambda: next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
loader = WindowLoader(WindowStore.open(sys.argv[1]), 8, 0, 2, seed=0)
for _ in range(20):
    loader.next_batch()
print(peak())  # KiB
"""


# -- the corpus ----------------------------------------------------------------------------------


def vocabulary(rng, n: int = 30_000) -> np.ndarray:
    syllables = np.array([c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["an", "er", "in", "on", "st"])
    lengths = rng.integers(1, 4, n)
    return np.array(["".join(rng.choice(syllables, k)) for k in lengths])


def documents(rng, vocab: np.ndarray, n: int) -> list[str]:
    """n documents of 50-110 words; 3% exact and 3% near copies of earlier ones in the file."""
    ranks = np.minimum(rng.zipf(1.2, size=n * 110), len(vocab)) - 1
    lengths, out, at = rng.integers(50, 111, n), [], 0
    for k in lengths:
        words = vocab[ranks[at : at + k]]
        at += k
        r = rng.random()
        if out and r < 0.03:
            out.append(out[rng.integers(len(out))])
            continue
        if out and r < 0.06:
            words = np.array(out[rng.integers(len(out))].rstrip(".").split())
            words[rng.integers(len(words), size=2)] = "changed"
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + ".")
    return out


def write_corpus(directory: Path, megabytes: float, seed: int = 0) -> Path:
    """.jsonl.zst files of about `megabytes` of text in all (reused if already written)."""
    done = directory / "DONE.json"
    if done.exists():
        return directory
    import pyarrow as pa

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab, written, files, docs = vocabulary(rng), 0, 0, 0
    while written < megabytes * 1e6:
        n = int(min(DOCS_PER_FILE, max(100, (megabytes * 1e6 - written) / 400)))
        lines = "".join(json.dumps({"text": d}) + "\n" for d in documents(rng, vocab, n)).encode()
        with pa.CompressedOutputStream(str(directory / f"part-{files:05d}.jsonl.zst"), "zstd") as f:
            f.write(lines)
        written, files, docs = written + len(lines), files + 1, docs + n
    done.write_text(json.dumps({"bytes": written, "files": files, "documents": docs}))
    return directory


# -- one size, in its own process ----------------------------------------------------------------


def private_kib(pid: int | str = "self") -> int:
    """RssAnon + RssFile: the process's own memory, without the shared object store."""
    with open(f"/proc/{pid}/status") as status:
        return sum(int(line.split()[1]) for line in status if line.startswith(("RssAnon:", "RssFile:")))


def shm_used_kib() -> int:
    """/dev/shm in use: Ray's object store lives there (its files unlinked, still counted)."""
    return shutil.disk_usage("/dev/shm").used // 1024


class WorkerPeaks(threading.Thread):
    """Samples the private RSS of this process and of every `ray::` process under it (this
    process's own Ray: its raylet starts the workers), not of another Ray on the machine."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks: dict[int, tuple[int, str]] = {}
        self.driver_kib, self.store_kib, self.shm_before = private_kib(), 0, shm_used_kib()
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.wait(0.25):
            self.driver_kib = max(self.driver_kib, private_kib())
            self.store_kib = max(self.store_kib, shm_used_kib() - self.shm_before)
            for process in me.children(recursive=True):
                try:
                    name = (process.cmdline() or [""])[0]
                    if name.startswith("ray::") and not name.startswith("ray::IDLE"):
                        kib = private_kib(process.pid)
                        if kib > self.peaks.get(process.pid, (0, ""))[0]:
                            self.peaks[process.pid] = (kib, name)
                except (psutil.Error, OSError, StopIteration):
                    continue  # the process ended between listing and reading

    def largest(self) -> tuple[int, str]:
        return max(self.peaks.values(), default=(0, "none"))


def measure_one(corpus: Path, work: Path) -> dict:
    from raylm.config import load_config
    from raylm.pipelines.data.prepare import prepare
    from raylm.pipelines.runtime import start_ray

    sizes = ["data.seq_len=1024", "model.block_size=1024", "tokenizer.vocab_size=8192"]
    cfg = load_config(None, [f"data.sources=[{{paths: ['{corpus}/*.jsonl.zst']}}]", *sizes])
    start_ray()
    watcher = WorkerPeaks()
    watcher.start()
    started = time.perf_counter()
    manifest = prepare(cfg.data, cfg.tokenizer, work / "out")
    seconds = time.perf_counter() - started
    watcher.stop.set()
    watcher.join()
    worker_kib, worker_task = watcher.largest()
    rank = subprocess.run(
        [sys.executable, "-c", RANK, str(Path(manifest.path) / "train")],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    tokens = sum(s.tokens for s in manifest.splits.values())
    made = json.loads((corpus / "DONE.json").read_text())
    return {
        "input_mb": made["bytes"] / 1e6,
        "documents": made["documents"],
        "tokens": tokens,
        "seconds": seconds,
        "stages": manifest.stage_seconds,
        "driver_mb": watcher.driver_kib / 1024,
        "worker_mb": worker_kib / 1024,
        "store_mb": watcher.store_kib / 1024,
        "worker_task": worker_task,
        "rank_mb": int(rank.stdout.split()[-1]) / 1024,
    }


# -- both sizes, side by side --------------------------------------------------------------------


def run_size(megabytes: float, work: Path) -> dict:
    corpus = write_corpus(work / f"corpus-{megabytes:g}mb", megabytes)
    out = subprocess.run(
        [sys.executable, __file__, "--one", str(corpus), "--work", str(work / f"run-{megabytes:g}mb")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if out.returncode:
        raise SystemExit(f"prepare of {megabytes:g} MB failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    # Ray may print after the result (its log lines reach the driver's stdout until it stops).
    found = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
    if not found:
        raise SystemExit(f"prepare of {megabytes:g} MB gave no result:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    result = json.loads(found[-1].removeprefix(RESULT))
    print(f"[scale] {megabytes:g} MB: {json.dumps(result)}", flush=True)  # each size as it ends: the 10x one is long
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-mb", type=float, default=200)
    parser.add_argument("--factor", type=float, default=10)
    parser.add_argument("--work", type=Path, default=Path("/tmp/raylm-prepare-scale"))
    parser.add_argument("--smoke", action="store_true", help="0.5 MB and 1 MB: check that it runs")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: measure one corpus
    args = parser.parse_args()
    if args.one:
        print(RESULT + json.dumps(measure_one(args.one, args.work)), flush=True)
        return
    small_mb, factor = (0.5, 2) if args.smoke else (args.small_mb, args.factor)
    runs = [run_size(small_mb, args.work), run_size(small_mb * factor, args.work)]
    header = (
        f"{'text':>10} {'documents':>11} {'tokens':>13} {'tokens/s':>10} {'driver':>9} {'worker':>9} {'rank':>8} "
        f"{'store':>8}"
    )
    print(header + "  largest worker's task")
    for r in runs:
        print(
            f"{r['input_mb']:8.1f}MB {r['documents']:11,} {r['tokens']:13,} {r['tokens'] / r['seconds']:10,.0f} "
            f"{r['driver_mb']:7.0f}MB {r['worker_mb']:7.0f}MB {r['rank_mb']:6.0f}MB {r['store_mb']:6.0f}MB  "
            f"{r['worker_task']}"
        )
    for r in runs:
        print(f"{r['input_mb']:8.1f}MB seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items()))
    small, large = runs
    grew = {k: large[f"{k}_mb"] / small[f"{k}_mb"] for k in ("driver", "worker", "rank")}
    speed = large["tokens"] / large["seconds"] / (small["tokens"] / small["seconds"])
    print(
        f"prepare scale x{large['input_mb'] / small['input_mb']:.1f} text: driver {grew['driver']:.2f}x, "
        f"largest worker {grew['worker']:.2f}x, rank {grew['rank']:.2f}x, tokens/s {speed:.2f}x"
    )


if __name__ == "__main__":
    main()
