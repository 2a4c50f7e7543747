"""Runs `prepare`, then `pretrain` with 2 workers, on a fake 3-node cluster (head with 0 CPUs +
2 nodes x 1 CPU, all on this machine) and prints, as JSON, the manifest, the nodes that ran
its data tasks, the nodes of the training workers and the final checkpoint.

A separate process because the test session already holds its own local Ray instance.
Usage: python -m tests.multinode CORPUS_DIR OUTPUT_DIR
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks

from raylm.config import load_config
from raylm.pipelines.data.prepare import prepare
from raylm.pipelines.runtime import configure_ray_data
from raylm.pipelines.train.pretrain import build_model_config, pretrain


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(corpus: str, out: str, overrides: list[str]) -> None:
    head = {"num_cpus": 0, "dashboard_host": "127.0.0.1", "dashboard_port": free_port()}  # 8265 may be taken
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="WARNING")
    configure_ray_data()
    try:
        cfg = load_config(None, [f"data.sources=[{{paths: ['{corpus}']}}]", *overrides])
        manifest = prepare(cfg.data, cfg.tokenizer, Path(out))
        tasks = list_tasks(
            address=cluster.address,
            filters=[("type", "=", "NORMAL_TASK")],
            detail=True,
            limit=10_000,
            raise_on_missing_output=False,
        )
        nodes = sorted({t.node_id for t in tasks if t.node_id and "_parse_file" in t.name})
        workers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
        result, _ = pretrain(
            build_model_config(cfg.model, manifest.vocab_size),
            cfg.train,
            cfg.scaling,
            cfg.run,
            manifest,
            tracking=None,
        )
        actors = list_actors(
            address=cluster.address,
            filters=[("class_name", "=", "RayTrainWorker")],
            detail=True,
            raise_on_missing_output=False,
        )
        print(
            "RESULT "
            + json.dumps(
                {
                    "manifest": manifest.to_dict() | {"path": manifest.path},
                    "parse_nodes": nodes,
                    "cpu_nodes": sorted(workers),
                    "train_nodes": sorted(a.node_id for a in actors),
                    "checkpoint": result.checkpoint.path,
                    "metrics": result.metrics,
                }
            )
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
