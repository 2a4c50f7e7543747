"""`raylm evaluate`: score a checkpoint on a prepared split, and on tasks (pipelines/eval/tasks.py),
with Ray Data batch inference.

Model replicas live in an actor pool (each loads the checkpoint once), so evaluation runs on
whatever CPUs/GPUs the cluster gives it, off the training workers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from raylm.errors import DataError
from raylm.models import load_model
from raylm.models.io import load_config
from raylm.pipelines.data.arrays import as_fixed_list
from raylm.pipelines.data.loader import WindowStore, read_range, table_of, windows_of
from raylm.pipelines.data.tokenizer import eos_id, load_tokenizer, token_byte_lengths
from raylm.pipelines.eval.scoring import score_windows, summarize
from raylm.pipelines.eval.tasks import Example, TaskSpec, aggregate, read_examples, score_rows
from raylm.pipelines.runtime import cluster_cpus
from raylm.storage import Location, locate

RANGE_ROWS = 1024  # windows per read task: 4 MB at seq_len 1024, 32 of ScoreWindows' batches


class ScoreWindows:
    """Ray Data stateful UDF: a batch of windows -> per-window nats, tokens and bytes."""

    def __init__(self, checkpoint_dir: Location):
        torch.set_num_threads(1)  # one replica per CPU; intra-op threads would oversubscribe
        self.model = load_model(checkpoint_dir).eval()
        tok = load_tokenizer(locate(checkpoint_dir) / "tokenizer.json")
        self.token_bytes = torch.from_numpy(token_byte_lengths(tok))

    def __call__(self, batch) -> dict:
        windows = torch.from_numpy(windows_of(batch).astype(np.int64))
        return {k: v.numpy() for k, v in score_windows(self.model, windows, self.token_bytes).items()}


def evaluate(checkpoint_dir: Path, split_dir: Path, max_windows: int | None = None) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte of the checkpoint on a split's windows
    (the first max_windows of them, in file order, if given)."""
    return score_dataset(checkpoint_dir, split_dataset(split_dir, max_windows))


def split_dataset(split_dir: Path, max_windows: int | None = None):
    """A split's first max_windows windows (all if None) as a Ray Data dataset: each task reads
    one range of RANGE_ROWS rows of one shard through a memory map, so no process holds the split."""
    import ray.data

    ranges = WindowStore.open(split_dir).ranges(max_windows, RANGE_ROWS)
    return ray.data.from_items(ranges).map_batches(_read_ranges, batch_size=1, batch_format="numpy")


def _read_ranges(batch: dict) -> pa.Table:
    rows = [read_range(str(p), int(a), int(b)) for p, a, b in zip(batch["path"], batch["start"], batch["stop"])]
    return table_of(np.concatenate(rows))


def evaluate_text(checkpoint_dir: Path, path: Path) -> dict[str, float]:
    """The same scores on any UTF-8 text file: paragraphs (split at blank lines) are documents,
    joined with EOS as in training, cut into windows of the model's context."""
    import ray.data

    tok = load_tokenizer(locate(checkpoint_dir) / "tokenizer.json")
    docs = [d.strip() for d in Path(path).read_text(encoding="utf-8", errors="replace").split("\n\n") if d.strip()]
    eos = eos_id(tok)
    stream = np.array(
        [i for e in tok.encode_batch_fast(docs, add_special_tokens=False) for i in [*e.ids, eos]], np.int32
    )
    width = load_config(checkpoint_dir).block_size + 1
    n = len(stream) // width
    if n == 0:
        raise DataError(f"{path}: {len(stream)} tokens, fewer than one window of {width}")
    windows = stream[: n * width].reshape(n, width)  # the tail shorter than a window is not scored
    return score_dataset(checkpoint_dir, ray.data.from_arrow(pa.table({"tokens": as_fixed_list(windows)})))


def score_dataset(checkpoint_dir: Path, ds) -> dict[str, float]:
    """Windows (a Ray Data dataset with a `tokens` column) scored on a pool of model replicas."""
    scored = ds.map_batches(
        ScoreWindows,
        fn_constructor_kwargs={"checkpoint_dir": locate(checkpoint_dir)},
        batch_size=32,
        batch_format="pyarrow",
        compute=replica_pool(),
        num_cpus=1,
    )
    totals = np.zeros(3)
    windows = 0
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        totals += [batch["nats"].sum(), batch["tokens"].sum(), batch["bytes"].sum()]
        windows += len(batch["nats"])
    metrics = summarize(*totals)
    return {**metrics, "windows": windows, "tokens": totals[1]}


def replica_pool():
    """Model replicas of 1 CPU each. One CPU stays free for the read tasks that feed the pool
    (a pool holding every CPU starves its own input on a 2-core machine)."""
    import ray.data

    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(cluster_cpus()) - 1))


class ScoreTaskExamples:
    """Ray Data stateful UDF: a batch of task examples -> their per-example results, from one
    model replica that loads the checkpoint once."""

    def __init__(self, checkpoint_dir: Location, specs: dict[str, dict]):
        torch.set_num_threads(1)  # one replica per CPU
        self.model = load_model(checkpoint_dir).eval()
        self.tokenizer = load_tokenizer(locate(checkpoint_dir) / "tokenizer.json")
        self.specs = {name: TaskSpec.model_validate(spec) for name, spec in specs.items()}

    def __call__(self, batch: dict) -> dict:
        by_task: dict[str, list[tuple[int, Example]]] = {}
        for k, (task, example) in enumerate(zip(batch["task"], batch["example"])):
            by_task.setdefault(task, []).append((k, Example(**json.loads(example))))
        results = [""] * len(batch["task"])
        for task, items in by_task.items():  # one batched call per task
            rows = score_rows(self.model, self.tokenizer, self.specs[task], [ex for _, ex in items])
            for (k, _), row in zip(items, rows):
                results[k] = json.dumps(row)
        return {"task": batch["task"], "index": batch["index"], "result": np.array(results, dtype=object)}


def evaluate_tasks(checkpoint_dir: Path, specs: list[TaskSpec], data_dir: Path) -> dict[str, tuple[dict, list[dict]]]:
    """Score a checkpoint on tasks with Ray Data batch inference over model replicas, on
    whatever CPUs (or GPUs) the cluster gives them, off the training workers. Returns, per
    task, its metrics and its per-example rows in file order."""
    import ray.data

    items = [
        {"task": spec.name, "index": i, "example": json.dumps(dataclasses.asdict(ex))}
        for spec in specs
        for i, ex in enumerate(read_examples(spec, data_dir))
    ]
    scored = ray.data.from_items(items).map_batches(
        ScoreTaskExamples,
        fn_constructor_kwargs={
            "checkpoint_dir": locate(checkpoint_dir),
            "specs": {s.name: s.model_dump() for s in specs},
        },
        batch_size=8,
        batch_format="numpy",
        compute=replica_pool(),
        num_cpus=1,
    )
    rows: dict[str, dict[int, dict]] = {spec.name: {} for spec in specs}
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        for task, index, result in zip(batch["task"], batch["index"], batch["result"]):
            rows[task][int(index)] = json.loads(result)
    out = {}
    for spec in specs:
        ordered = [rows[spec.name][i] for i in sorted(rows[spec.name])]
        out[spec.name] = (aggregate(spec, ordered), ordered)
    return out
