"""How evaluation's scoring replicas are placed and sized (pipelines/eval/evaluate.py): on the
local instance as it is, and on a cluster joined by address from the config's worker groups."""

from __future__ import annotations

import pytest

from raylm.config import PRESETS, ClusterSection, EvalSection
from raylm.errors import ConfigError
from raylm.models.config import ModelConfig
from raylm.pipelines import runtime
from raylm.pipelines.eval.evaluate import Replicas, plan_replicas, windows_per_pass


def test_the_local_instance_gets_cpu_replicas_that_leave_a_cpu_for_their_reads(ray_cluster):
    cpus = int(ray_cluster["CPU"])
    plan = plan_replicas(EvalSection())
    assert plan == Replicas(gpus=0.0, threads=max(1, min(4, cpus // 4)), size=max(1, cpus - 1), bf16=False)
    assert plan_replicas(EvalSection(precision="bf16", replicas=3, cpus_per_replica=2)) == Replicas(0.0, 2, 3, True)
    with pytest.raises(ConfigError, match=r"eval.gpus_per_replica=1: this Ray cluster has no GPU"):
        plan_replicas(EvalSection(gpus_per_replica=1))


def test_a_rendered_cluster_sizes_the_pool_from_its_worker_groups(ray_cluster, monkeypatch):
    """On a cluster `raylm cluster render` laid out (its pods say so) the pool may grow to what
    the groups reach at max_nodes (Ray Data asks the autoscaler for the rest), not to the CPUs
    up when evaluation starts. A cluster joined otherwise is sized by what it has: the config's
    cluster section describes nothing there (a 4-thread replica would wait forever on 2 CPUs)."""
    cluster = ClusterSection.model_validate({"gpu": {"max_nodes": 2, "gpus_per_node": 8}, "cpu": {"max_nodes": 4}})
    monkeypatch.setattr(runtime, "_cluster", cluster)
    cpus = int(ray_cluster["CPU"])
    assert plan_replicas(EvalSection()) == Replicas(gpus=0.0, threads=max(1, min(4, cpus // 4)), size=max(1, cpus - 1))
    monkeypatch.setenv(runtime.RENDERED_CLUSTER, "1")
    assert plan_replicas(EvalSection()) == Replicas(gpus=1.0, threads=1, size=16, bf16=True)
    assert plan_replicas(EvalSection(gpus_per_replica=0.5, precision="fp32")).size == 32
    # CPU replicas on 4 x 16 CPUs: 4 threads each, 15 of them beside one CPU for reads.
    assert plan_replicas(EvalSection(gpus_per_replica=0)) == Replicas(gpus=0.0, threads=4, size=15, bf16=False)


def test_a_gpu_pass_fits_half_the_free_memory():
    big = ModelConfig(**{**PRESETS["llama-1b"], "vocab_size": 128_256, "block_size": 2048})
    # 10 bytes a token for each of 128k logits is 2.6 GB a window of 2048: 15 of them in 80 GB.
    assert windows_per_pass(big, 80 * 2**30) == 15
    tiny = ModelConfig(n_layer=2, n_head=2, n_kv_head=2, n_embd=64, block_size=64, vocab_size=512)
    assert windows_per_pass(tiny, 80 * 2**30) == 256 and windows_per_pass(tiny, 0) == 1
