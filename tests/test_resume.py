"""Exact resume on real Ray Train: a run stopped by its token budget, or resumed past a torn
checkpoint, gives the same per-step losses as a run that never stopped."""

import pytest
from mlflow.tracking import MlflowClient

from raylm.cli import main

from .conftest import REPO, tiny_overrides

STEPS, STOP = 16, 6
TOKENS_PER_STEP = 16 * 64  # train.batch_size x data.seq_len of tiny_overrides


def cli(command: str, tmp, overrides: list[str]) -> int:
    args = [*tiny_overrides(tmp), *overrides]
    return main([command, str(REPO / "configs" / "quickstart.yaml"), *[x for o in args for x in ("--set", o)]])


def pretrain(tmp, name: str, extra: list[str] = ()) -> int:
    return cli("pretrain", tmp, [f"run.name={name}", f"train.max_steps={STEPS}", "train.log_interval=1",
                                 "train.eval_interval=100", "train.checkpoint_interval=100", "train.warmup_steps=3", *extra])


def losses(tmp, run_name: str) -> list[dict[int, float]]:
    """Per MLflow run of `pretrain-<run_name>`, oldest first: step -> train loss."""
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("raylm").experiment_id],
                              filter_string=f"tags.mlflow.runName = 'pretrain-{run_name}'", order_by=["start_time ASC"])
    return [{m.step: m.value for m in client.get_metric_history(r.info.run_id, "train_loss")} for r in runs]


@pytest.fixture(scope="module")
def straight(ray_cluster, tmp_path_factory):
    """Prepared data and the losses of a run that was never interrupted."""
    tmp = tmp_path_factory.mktemp("resume")
    assert cli("prepare", tmp, []) == 0
    assert pretrain(tmp, "straight") == 0
    (reference,) = losses(tmp, "straight")
    assert sorted(reference) == list(range(1, STEPS + 1))
    return tmp, reference


def test_budget_stop_then_relaunch_continues_bit_for_bit(straight):
    tmp, reference = straight
    assert pretrain(tmp, "stopped", [f"train.max_tokens={STOP * TOKENS_PER_STEP}"]) == 0
    run_dir = tmp / "runs" / "train" / "stopped"
    assert sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()) == [f"checkpoint_{STOP:06d}"]
    assert pretrain(tmp, "stopped") == 0  # the same run name resumes from that checkpoint
    first, second = losses(tmp, "stopped")
    assert sorted(first) == list(range(1, STOP + 1)) and sorted(second) == list(range(STOP + 1, STEPS + 1))
    assert {**first, **second} == reference


def test_torn_checkpoint_is_skipped_for_the_previous_one(straight, capfd):
    tmp, reference = straight
    assert pretrain(tmp, "torn", ["train.checkpoint_interval=8"]) == 0
    weights = tmp / "runs" / "train" / "torn" / "checkpoint_000016" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    capfd.readouterr()
    assert pretrain(tmp, "torn") == 0
    out = capfd.readouterr().out
    assert "skipping" in out and "checkpoint_000016: torn (model.safetensors has 1000 bytes" in out
    _, resumed = losses(tmp, "torn")
    assert sorted(resumed) == list(range(9, STEPS + 1))  # from checkpoint_000008
    assert resumed == {step: reference[step] for step in resumed}


def test_killed_worker_restarts_from_the_last_checkpoint(straight, capfd):
    """SIGKILL one training worker mid-run: Ray Train (scaling.max_failures=1) restarts the
    worker group from the last checkpoint, and every step's loss equals the uninterrupted run."""
    import os
    import signal
    import threading
    import time

    from ray.util.state import list_actors

    tmp, reference = straight
    # A checkpoint every step slows the run enough (Ray's report per step) to kill it midway.
    job = threading.Thread(target=lambda: results.append(
        pretrain(tmp, "killed", ["train.checkpoint_interval=1", "scaling.max_failures=1"])))
    results: list[int] = []
    job.start()
    marker = tmp / "runs" / "train" / "killed" / "checkpoint_000004" / "COMMIT.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True)
    victim = max(w.pid for w in workers)
    os.kill(victim, signal.SIGKILL)
    print(f"[test] killed training worker pid {victim} after checkpoint_000004")
    job.join(timeout=300)
    assert results == [0]
    out = capfd.readouterr().out
    assert "resumed from" in out, "the worker group never restarted from a checkpoint"
    (history,) = losses(tmp, "killed")  # steps after the last checkpoint appear twice: run, rerun
    assert sorted(history) == list(range(1, STEPS + 1))
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raylm").experiment_id],
                                filter_string="tags.mlflow.runName = 'pretrain-killed'")
    every = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert all(value == reference[step] for step, value in every)


def test_resume_path_starts_a_new_run_from_another_runs_checkpoint(straight, capsys):
    tmp, _ = straight
    source = tmp / "runs" / "train" / "straight" / f"checkpoint_{STEPS:06d}"
    args = ["pretrain", str(REPO / "configs" / "quickstart.yaml"), "--resume", str(source)]
    overrides = [*tiny_overrides(tmp), "run.name=branch", "train.max_steps=20", "train.log_interval=1",
                 "train.eval_interval=100", "train.checkpoint_interval=100", "train.warmup_steps=3"]
    assert main([*args, *[x for o in overrides for x in ("--set", o)]]) == 0
    (continued,) = losses(tmp, "branch")
    assert sorted(continued) == [17, 18, 19, 20]  # on from the other run's step 16
    bigger = [*overrides, "model.n_embd=128", "run.name=other"]
    assert main([*args, *[x for o in bigger for x in ("--set", o)]]) == 2
    assert "--resume" in capsys.readouterr().err
