"""raylm.storage and models.shards without Ray: a Location reads like a Path, and the ranged
safetensors reader returns what safetensors itself returns, refusing what it refuses. The same
code on S3 runs in test_faults.py (checkpoints on moto's S3 server)."""

from __future__ import annotations

import pickle

import pytest
import safetensors.torch
import torch

from raylm.errors import DataError
from raylm.models.shards import SafetensorsFile
from raylm.storage import locate


def test_a_location_lists_reads_and_names_like_a_path(tmp_path):
    (tmp_path / "run" / "checkpoint_000002" / "state").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint_000002" / "state" / "a.safetensors").write_bytes(b"12345")
    (tmp_path / "run" / "checkpoint_000004").mkdir()
    (tmp_path / "run" / "checkpoint_manager_snapshot.json").write_text("{}")
    run = locate(tmp_path / "run")
    assert [p.name for p in run.subdirs("checkpoint_*")] == ["checkpoint_000002", "checkpoint_000004"]
    assert [p.name for p in run.glob("checkpoint_*")] == ["checkpoint_manager_snapshot.json"]
    assert (run / "checkpoint_000002").files() == [("state/a.safetensors", 5)]
    assert (run / "checkpoint_000002" / "state" / "a.safetensors").read_bytes() == b"12345"
    assert (run / "checkpoint_000004").parent == run and run.local == tmp_path / "run"
    assert not (run / "nothing").exists() and (run / "nothing").subdirs("*") == []
    with pytest.raises(
        DataError, match=r"hf://org/m: checkpoints live on a local path, a mounted volume, or s3:// gs://"
    ):
        locate("hf://org/m")


def test_ranged_reads_return_what_safetensors_returns(tmp_path):
    tensors = {
        "w": torch.randn(7, 3, 5),
        "h": torch.randn(4, 6).to(torch.bfloat16),
        "step": torch.tensor(12.0),
        "ids": torch.arange(9, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"k": "v"})
    with SafetensorsFile(locate(path)) as f:
        assert sorted(f.keys()) == sorted(tensors) and f.metadata == {"k": "v"}
        for name, value in tensors.items():
            assert f.shape(name) == tuple(value.shape) and f.dtype(name) == value.dtype
            assert torch.equal(f.read(name), value)
        before = f.bytes_read
        assert torch.equal(f.read("w", slice(2, 5)), tensors["w"][2:5])
        assert f.bytes_read - before == 3 * 3 * 5 * 4  # the three rows, nothing more


@pytest.mark.parametrize(
    "content",
    [
        pickle.dumps({"w": [1.0, 2.0]}),  # a pickle handed over as weights
        b"\x10\x00\x00\x00\x00\x00\x00\x00{}",  # a header longer than the file
        b"",
    ],
)
def test_what_is_not_safetensors_is_refused_before_any_tensor_is_read(tmp_path, content):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"{path} is not a safetensors file"):
        SafetensorsFile(locate(path))


def test_a_cut_file_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file({"w": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])  # a copy cut short
    with pytest.raises(DataError, match=r"not a safetensors file \(w: bytes 0\.\.16384 do not hold"):
        SafetensorsFile(locate(path))
