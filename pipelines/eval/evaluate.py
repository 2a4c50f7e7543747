"""`raylm evaluate`: score a checkpoint on a prepared split, and on tasks (pipelines/eval/tasks.py),
with Ray Data batch inference.

Model replicas live in an actor pool (each loads the checkpoint once), so evaluation runs on
whatever CPUs/GPUs the cluster gives it, off the training workers.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from raylm.config import ReplicaSection
from raylm.errors import ConfigError, DataError
from raylm.models import load_model
from raylm.models.io import load_config
from raylm.pipelines.data.arrays import as_fixed_list
from raylm.pipelines.data.loader import WindowStore, read_range, table_of, windows_of
from raylm.pipelines.data.tokenizer import eos_id, load_tokenizer, token_byte_lengths
from raylm.pipelines.eval.scoring import score_windows, summarize
from raylm.pipelines.eval.tasks import Example, TaskSpec, aggregate, load_task, read_examples, score_rows
from raylm.pipelines.runtime import node_cpus, on_rendered_cluster, reachable
from raylm.storage import Location, locate

RANGE_ROWS = 1024  # windows per read task: 4 MB at seq_len 1024, 32 of ScoreWindows' batches


@dataclass(frozen=True)
class Replicas:
    """How the scoring replicas run: a GPU share each (0: on CPU), CPU threads each, the most
    replicas of the pool, bf16 autocast or fp32, and windows per forward pass (None: chosen by
    the replica, from its GPU's free memory, or 32 on CPU)."""

    gpus: float = 0.0
    threads: int = 1
    size: int = 1
    bf16: bool = False
    batch: int | None = None

    @property
    def rows_per_call(self) -> int:
        """Windows Ray Data hands a replica per call; a GPU replica splits them into passes."""
        return self.batch or (256 if self.gpus else 32)

    def pool(self) -> dict:
        """map_batches' arguments that place the replicas."""
        import ray.data

        return {
            "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=self.size),
            "num_cpus": self.threads,
            "num_gpus": self.gpus,
        }


def plan_replicas(section: ReplicaSection, key: str = "eval") -> Replicas:
    """Replicas for this cluster: one GPU each where it has (or its GPU group can bring up)
    GPUs, else CPU replicas of a few threads, as many as the reachable CPUs allow less one CPU
    for the read tasks that feed them (a pool holding every CPU starves its own input). `key`
    names the section in errors."""
    gpus_up = reachable("GPU")
    gpus = section.gpus_per_replica if section.gpus_per_replica is not None else (1.0 if gpus_up else 0.0)
    if gpus:
        if gpus_up == 0 and not on_rendered_cluster():  # no autoscaler to bring one: they would wait forever
            raise ConfigError(f"{key}.gpus_per_replica={gpus:g}: this Ray cluster has no GPU; set it to 0")
        size = section.replicas or max(1, int(gpus_up / gpus))
        return Replicas(gpus, 1, size, section.precision != "fp32", section.batch_windows)
    cpus = reachable("CPU")
    # Up to 4 threads a replica rather than a replica a CPU: each replica holds a copy of the
    # weights (0.5 GB at 124M, 28 GB at 7B in fp32), and its matmuls use all its threads.
    threads = section.cpus_per_replica or max(1, min(4, int(cpus) // 4, int(node_cpus())))
    size = section.replicas or max(1, int(cpus - 1) // threads)
    return Replicas(0.0, threads, size, section.precision == "bf16", section.batch_windows)


def load_replica(checkpoint_dir: Location, replicas: Replicas) -> torch.nn.Module:
    """The checkpoint's model on this replica's device, for scoring."""
    torch.set_num_threads(replicas.threads)  # the CPUs Ray gave this actor; more would oversubscribe
    return load_model(checkpoint_dir, "cuda" if replicas.gpus else "cpu").eval()


def scoring_precision(model: torch.nn.Module, replicas: Replicas):
    """bf16 autocast on the model's device where asked; weights stay fp32, losses are summed
    in fp32 (score_windows upcasts the logits)."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=replicas.bf16)


def windows_per_pass(config, free_bytes: int) -> int:
    """Windows of one forward pass that fit half the free GPU memory: per window, the logits
    in bf16, their fp32 copy and cross_entropy's fp32 log-probs (10 bytes a token a vocabulary
    entry, 2.6 GB at seq 2048 and Llama 3's 128k vocabulary) and one block's activations."""
    per_token = 10 * config.vocab_size + 2 * (8 * config.n_embd + 3 * config.ffn_width())
    return max(1, min(256, free_bytes // 2 // (per_token * config.block_size)))


class ScoreWindows:
    """Ray Data stateful UDF: a batch of windows -> per-window nats, tokens and bytes."""

    def __init__(self, checkpoint_dir: Location, replicas: Replicas):
        self.replicas = replicas
        self.model = load_replica(checkpoint_dir, replicas)
        self.device = next(self.model.parameters()).device
        tok = load_tokenizer(locate(checkpoint_dir) / "tokenizer.json")
        self.token_bytes = torch.from_numpy(token_byte_lengths(tok)).to(self.device)
        self.per_pass = replicas.batch or (
            windows_per_pass(self.model.config, torch.cuda.mem_get_info()[0]) if self.device.type == "cuda" else 32
        )

    def __call__(self, batch) -> dict:
        windows = torch.from_numpy(windows_of(batch).astype(np.int64))
        parts = []
        with scoring_precision(self.model, self.replicas):
            for chunk in windows.split(self.per_pass):
                parts.append(score_windows(self.model, chunk.to(self.device), self.token_bytes))
        return {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]}


def evaluate(
    checkpoint_dir: Path, split_dir: Path, max_tokens: int | None = None, replicas: Replicas | None = None
) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte of the checkpoint on a split's windows:
    about max_tokens target tokens of them (all if None), from every shard."""
    store = WindowStore.open(split_dir)
    n = None if max_tokens is None else max(1, -(-max_tokens // (store.row_shape[-1] - 1)))
    scores = score_dataset(checkpoint_dir, split_dataset(store, n), replicas)
    return {**scores, "split_windows": len(store)}


def split_dataset(store: WindowStore, n: int | None = None):
    """n windows of a split (all if None; WindowStore.ranges picks them) as a Ray Data
    dataset: each task reads one range of RANGE_ROWS rows of one shard through a memory map,
    so no process holds the split."""
    import ray.data

    ranges = store.ranges(n, RANGE_ROWS)
    return ray.data.from_items(ranges).map_batches(_read_ranges, batch_size=1, batch_format="numpy")


def _read_ranges(batch: dict) -> pa.Table:
    rows = [read_range(str(p), int(a), int(b)) for p, a, b in zip(batch["path"], batch["start"], batch["stop"])]
    return table_of(np.concatenate(rows))


def evaluate_text(checkpoint_dir: Path, path: Path, replicas: Replicas | None = None) -> dict[str, float]:
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
    return score_dataset(checkpoint_dir, ray.data.from_arrow(pa.table({"tokens": as_fixed_list(windows)})), replicas)


def score_dataset(checkpoint_dir: Path, ds, replicas: Replicas | None = None) -> dict[str, float]:
    """Windows (a Ray Data dataset with a `tokens` column) scored on a pool of model replicas."""
    replicas = replicas or plan_replicas(ReplicaSection())
    scored = ds.map_batches(
        ScoreWindows,
        fn_constructor_kwargs={"checkpoint_dir": locate(checkpoint_dir), "replicas": replicas},
        batch_size=replicas.rows_per_call,
        batch_format="pyarrow",
        **replicas.pool(),
    )
    totals = np.zeros(3)
    windows = 0
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        totals += [batch["nats"].sum(), batch["tokens"].sum(), batch["bytes"].sum()]
        windows += len(batch["nats"])
    metrics = summarize(*totals)
    return {**metrics, "windows": windows, "tokens": totals[1]}


class ScoreTaskExamples:
    """Ray Data stateful UDF: a batch of task examples -> their per-example results, from one
    model replica that loads the checkpoint once."""

    def __init__(self, checkpoint_dir: Location, specs: dict[str, dict], replicas: Replicas):
        self.replicas = replicas
        self.model = load_replica(checkpoint_dir, replicas)
        self.tokenizer = load_tokenizer(locate(checkpoint_dir) / "tokenizer.json")
        self.specs = {name: TaskSpec.model_validate(spec) for name, spec in specs.items()}

    def __call__(self, batch: dict) -> dict:
        by_task: dict[str, list[tuple[int, Example]]] = {}
        for k, (task, example) in enumerate(zip(batch["task"], batch["example"])):
            by_task.setdefault(task, []).append((k, Example(**json.loads(example))))
        results = [""] * len(batch["task"])
        for task, items in by_task.items():  # one batched call per task
            with scoring_precision(self.model, self.replicas):
                rows = score_rows(self.model, self.tokenizer, self.specs[task], [ex for _, ex in items])
            for (k, _), row in zip(items, rows):
                results[k] = json.dumps(row)
        return {"task": batch["task"], "index": batch["index"], "result": np.array(results, dtype=object)}


def evaluate_tasks(
    checkpoint_dir: Path, specs: list[TaskSpec], data_dir: Path, replicas: Replicas | None = None
) -> dict[str, tuple[dict, list[dict]]]:
    """Score a checkpoint on tasks with Ray Data batch inference over model replicas, on
    whatever CPUs (or GPUs) the cluster gives them, off the training workers. Returns, per
    task, its metrics and its per-example rows in file order."""
    import ray.data

    replicas = replicas or plan_replicas(ReplicaSection())
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
            "replicas": replicas,
        },
        batch_size=64 if replicas.gpus else 8,  # examples; a GPU's passes want more at once
        batch_format="numpy",
        **replicas.pool(),
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


@dataclass
class TaskScores:
    """A checkpoint's scores on tasks: per task its metrics and per-example rows (file order)."""

    metrics: dict[str, dict[str, float]]
    rows: dict[str, list[dict]]
    seconds: float

    def flat(self) -> dict[str, float]:
        """As MLflow metrics: task/<name>/<metric>, and task/examples_per_s."""
        examples = sum(m["examples"] for m in self.metrics.values())
        out = {f"task/{name}/{k}": v for name, m in self.metrics.items() for k, v in m.items()}
        return out | {"task/examples_per_s": examples / self.seconds}


def score_tasks(
    checkpoint_dir: Path, paths: list[str], limit: int | None, data_dir: Path, replicas: Replicas
) -> TaskScores:
    """The task files' tasks (their first `limit` examples, if given) on replica actors."""
    specs = [load_task(path) for path in paths]
    for spec in specs:
        spec.limit = limit or spec.limit
    started = time.perf_counter()
    results = evaluate_tasks(checkpoint_dir, specs, data_dir, replicas)
    seconds = time.perf_counter() - started
    return TaskScores({n: m for n, (m, _) in results.items()}, {n: rows for n, (_, rows) in results.items()}, seconds)


def table_name(task: str, step: int | None = None) -> str:
    """Where a task's per-example table goes in the run: eval/<task>.json, or for one
    checkpoint of several, eval/step_<step>/<task>.json."""
    return f"eval/{task}.json" if step is None else f"eval/step_{step:06d}/{task}.json"


def headline(metrics: dict[str, dict[str, float]]) -> str:
    """Each task's first metric, for a log line: "arc_easy acc 0.2500 | svamp accuracy 0.0000"."""
    return " | ".join(f"{task} {next(iter(m))} {next(iter(m.values())):.4f}" for task, m in metrics.items())
