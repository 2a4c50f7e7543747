"""On a 3-node cluster, prepare spreads its work over the nodes and writes the same windows
and tokenizer as on one node, and a 2-worker training job runs one worker on each node."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raylm.config import load_config
from raylm.pipelines.data.manifest import Manifest
from raylm.pipelines.data.prepare import prepare
from tests.conftest import REPO

OVERRIDES = ["data.seq_len=32", "tokenizer.vocab_size=400"]
TRAIN = [
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "model.block_size=32",
    "train.max_steps=4",
    "train.batch_size=8",
    "train.micro_batch_size=4",
    "train.eval_windows=8",
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=1",
]


@pytest.mark.slow  # a scale run: ~100 s of a separate 3-node cluster
def test_multinode_prepare_and_train_spread_over_the_nodes(ray_cluster, tmp_path):
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = [f"w{i}" for i in range(2000)]
    for f in range(6):
        (corpus / f"part{f}.txt").write_text("\n\n".join(" ".join(rng.choice(words, 60)) for _ in range(300)))
    cfg = load_config(None, [f"data.sources=[{{paths: ['{corpus}']}}]", *OVERRIDES])
    single = prepare(cfg.data, cfg.tokenizer, tmp_path / "single")

    multi_out = tmp_path / "multi"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.multinode",
            str(corpus),
            str(multi_out),
            *OVERRIDES,
            *TRAIN,
            f"run.output_dir={multi_out}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    multi = Manifest.from_dict(result["manifest"])

    assert result["parse_nodes"] == result["cpu_nodes"] and len(result["cpu_nodes"]) == 2
    assert multi.splits == single.splits  # window counts and content hashes
    assert multi.sources == single.sources
    tokenizer = lambda m: (Path(m.path) / "tokenizer.json").read_bytes()  # noqa: E731
    assert tokenizer(multi) == tokenizer(single)
    # Training: one worker per node (each has 1 CPU), and the run finished its 4 steps.
    assert len(result["train_nodes"]) == 2 and set(result["train_nodes"]) == set(result["cpu_nodes"])
    assert result["metrics"]["step"] == 4 and Path(result["checkpoint"]).name == "checkpoint_000004"
