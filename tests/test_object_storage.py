"""Sources on object storage, end to end: an S3 endpoint (moto's server mode) on 127.0.0.1,
reached through pyarrow's S3 filesystem exactly as a user reaches AWS or MinIO, the endpoint
given by AWS_ENDPOINT_URL. The same corpus prepared from S3 and from local disk gives the same
windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raylm.config import load_config
from raylm.errors import DataError
from raylm.pipelines.data.prepare import prepare
from tests.conftest import S3_KEYS as KEYS


def write_corpus(directory: Path) -> None:
    """A .jsonl.zst file and a Parquet file: 1,200 documents, some of them duplicates."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(3000)]
    docs = [" ".join(rng.choice(vocab, 40)) for _ in range(1000)]
    docs += [docs[i] for i in rng.integers(0, 1000, 200)]  # exact duplicates
    directory.mkdir(parents=True)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[:700]).encode()
    with pa.CompressedOutputStream(str(directory / "part-0.jsonl.zst"), "zstd") as f:
        f.write(lines)
    pq.write_table(pa.table({"text": docs[700:]}), directory / "part-1.parquet", row_group_size=100)


def upload(fs: pafs.FileSystem, local: Path, bucket: str) -> None:
    fs.create_dir(bucket)
    for path in sorted(local.iterdir()):
        # compression=None: the default ("detect") would zstd-compress the .zst file again.
        with fs.open_output_stream(f"{bucket}/corpus/{path.name}", compression=None) as out:
            out.write(path.read_bytes())


def test_prepare_reads_zst_and_parquet_sources_from_s3_as_from_disk(ray_cluster, s3_endpoint, tmp_path, monkeypatch):
    for key, value in {**KEYS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    write_corpus(tmp_path / "corpus")
    fs = pafs.S3FileSystem(
        endpoint_override=s3_endpoint,
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    upload(fs, tmp_path / "corpus", "raylm-data")
    manifests = {}
    for where, pattern in (("local", f"{tmp_path / 'corpus'}/*"), ("s3", "s3://raylm-data/corpus/*")):
        cfg = load_config(
            None,
            [
                f"data.sources=[{{paths: ['{pattern}'], name: corpus}}]",
                "data.seq_len=16",
                "tokenizer.vocab_size=300",
            ],
        )
        manifests[where] = prepare(cfg.data, cfg.tokenizer, tmp_path / where)
    local, s3 = manifests["local"], manifests["s3"]
    assert s3.splits == local.splits and s3.splits["train"].windows > 0  # window counts and content hashes
    report = json.loads((Path(s3.path) / "report.json").read_text())
    assert report["sources"]["corpus"]["files"] == 2
    assert report["sources"]["corpus"]["rejects"]["exact_duplicate"]["docs"] == 200  # every planted copy


def test_a_missing_s3_prefix_fails_naming_the_key(ray_cluster, s3_endpoint, tmp_path, monkeypatch):
    for key, value in {**KEYS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(None, ["data.sources=[{paths: ['s3://raylm-data/nothing-here/*.jsonl']}]"])
    with pytest.raises(DataError, match=r"^data\.sources\.0\.paths: .*'s3://raylm-data/nothing-here/\*\.jsonl'"):
        prepare(cfg.data, cfg.tokenizer, tmp_path)
