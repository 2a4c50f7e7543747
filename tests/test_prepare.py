"""`raylm prepare` on user files, with a real Ray Data pipeline and real tokenizers."""

import json
from pathlib import Path

import numpy as np
import pytest

from raylm.pipelines.config import load_config
from raylm.pipelines.errors import DataError
from raylm.pipelines.loader import read_windows
from raylm.pipelines.prepare import find_prepared, prepare
from raylm.pipelines.tokenizer import load_tokenizer

WORDS = "river stone light morning garden window letter market silver harbor".split()


def write_corpus(directory, n_files=3, docs_per_file=60):
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for f in range(n_files):
        docs = [" ".join(rng.choice(WORDS, size=rng.integers(5, 30))) + "." for _ in range(docs_per_file)]
        (directory / f"part{f}.txt").write_text("\n\n".join(docs) + "\n\n\n")
    (directory / "notes.csv").write_text("not,text\n")  # ignored: not a text suffix


def config(tmp_path, *extra):
    return load_config(None, [f"data.paths=['{tmp_path / 'corpus'}']", "data.seq_len=32",
                              "tokenizer.vocab_size=300", "data.val_fraction=0.2", *extra])


def test_prepare_user_files_counts_add_up_and_windows_decode(ray_cluster, tmp_path):
    write_corpus(tmp_path / "corpus")
    cfg = config(tmp_path)
    m = prepare(cfg.data, cfg.tokenizer, tmp_path / "out")
    assert m["files"] == 3
    docs = m["documents"]
    assert docs["train"]["rows"] + docs["val"]["rows"] == 180 and docs["drop"]["rows"] == 3  # one empty tail per file
    for split in ("train", "val"):
        windows = read_windows(f"{m['path']}/{split}")
        assert windows.shape == (m["splits"][split]["windows"], 33)
    tok = load_tokenizer(f"{m['path']}/tokenizer.json")
    text = tok.decode(read_windows(f"{m['path']}/train")[0].tolist())
    assert set(text.replace(".", " ").split()) <= set(WORDS)
    assert json.loads((Path(m["path"]) / "manifest.json").read_text()) | {"path": m["path"]} == m


def test_second_prepare_reuses_output_and_stage_lookup_finds_it(ray_cluster, tmp_path, capsys):
    write_corpus(tmp_path / "corpus")
    cfg = config(tmp_path)
    first = prepare(cfg.data, cfg.tokenizer, tmp_path / "out")
    second = prepare(cfg.data, cfg.tokenizer, tmp_path / "out")
    assert "reusing prepared data" in capsys.readouterr().out
    assert first == second == find_prepared(cfg.data, cfg.tokenizer, tmp_path / "out")
    # A run that died before writing its manifest is redone from scratch, not appended to.
    (Path(first["path"]) / "manifest.json").unlink()
    redone = prepare(cfg.data, cfg.tokenizer, tmp_path / "out")
    assert {k: v for k, v in redone.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
    assert len(read_windows(Path(redone["path"]) / "train")) == first["splits"]["train"]["windows"]
    changed = config(tmp_path, "data.seq_len=16")
    with pytest.raises(DataError, match="run `raylm prepare`"):
        find_prepared(changed.data, changed.tokenizer, tmp_path / "out")


def test_path_matching_nothing_is_an_error(tmp_path):
    cfg = load_config(None, [f"data.paths=['{tmp_path / 'nothing' / '*.txt'}']"])
    with pytest.raises(DataError, match="matches no text files"):
        prepare(cfg.data, cfg.tokenizer, tmp_path / "out")
