"""`raylm evaluate`: score a checkpoint on a prepared split with Ray Data batch inference.

Model replicas live in an actor pool (each loads the checkpoint once), so evaluation runs on
whatever CPUs/GPUs the cluster gives it, off the training workers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from raylm.models import load_model

from .loader import token_matrix
from .runtime import cluster_cpus
from .scoring import score_windows, summarize
from .tokenizer import load_tokenizer, token_byte_lengths


class ScoreWindows:
    """Ray Data stateful UDF: a batch of windows -> per-window nats, tokens and bytes."""

    def __init__(self, checkpoint_dir: str):
        torch.set_num_threads(1)  # one replica per CPU; intra-op threads would oversubscribe
        self.model = load_model(checkpoint_dir).eval()
        tok = load_tokenizer(Path(checkpoint_dir) / "tokenizer.json")
        self.token_bytes = torch.from_numpy(token_byte_lengths(tok))

    def __call__(self, batch) -> dict:
        windows = torch.from_numpy(token_matrix(batch.column("tokens")).astype(np.int64))
        return {k: v.numpy() for k, v in score_windows(self.model, windows, self.token_bytes).items()}


def evaluate(checkpoint_dir: Path, split_dir: Path, max_windows: int | None = None) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte of the checkpoint on a split's windows."""
    import ray.data

    ds = ray.data.read_parquet(str(split_dir))
    if max_windows:
        ds = ds.limit(max_windows)
    scored = ds.map_batches(
        ScoreWindows,
        fn_constructor_kwargs={"checkpoint_dir": str(checkpoint_dir)},
        batch_size=32,
        batch_format="pyarrow",
        # One CPU stays free for the read tasks that feed the pool (a pool holding every CPU
        # starves its own input on a 2-core machine).
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(cluster_cpus()) - 1)),
        num_cpus=1,
    )
    totals = np.zeros(3)
    windows = 0
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        totals += [batch["nats"].sum(), batch["tokens"].sum(), batch["bytes"].sum()]
        windows += len(batch["nats"])
    metrics = summarize(*totals)
    return {**metrics, "windows": windows, "tokens": totals[1]}
