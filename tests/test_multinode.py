"""prepare on a 3-node cluster spreads its work over the nodes and writes the same windows
and tokenizer as on one node."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from raylm.pipelines.config import load_config
from raylm.pipelines.prepare import prepare

from .conftest import REPO

OVERRIDES = ["data.seq_len=32", "tokenizer.vocab_size=400"]


def test_multinode_prepare_spreads_and_matches_single_node(ray_cluster, tmp_path):
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = [f"w{i}" for i in range(2000)]
    for f in range(6):
        (corpus / f"part{f}.txt").write_text("\n\n".join(" ".join(rng.choice(words, 60)) for _ in range(300)))
    cfg = load_config(None, [f"data.sources=[{{paths: ['{corpus}']}}]", *OVERRIDES])
    single = prepare(cfg.data, cfg.tokenizer, tmp_path / "single")

    proc = subprocess.run([sys.executable, "-m", "tests.multinode", str(corpus), str(tmp_path / "multi"), *OVERRIDES],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    multi = result["manifest"]

    assert result["parse_nodes"] == result["cpu_nodes"] and len(result["cpu_nodes"]) == 2
    assert multi["splits"] == single["splits"]  # window counts and content hashes
    assert multi["sources"] == single["sources"]
    tokenizer = lambda m: (Path(m["path"]) / "tokenizer.json").read_bytes()  # noqa: E731
    assert tokenizer(multi) == tokenizer(single)
