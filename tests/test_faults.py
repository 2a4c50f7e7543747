"""Exact resume on real Ray Train: a run stopped by its token budget, by SIGTERM, by a killed
worker, or resumed past a torn checkpoint, gives the same per-step losses as a run that never
stopped; with another worker count or FSDP instead of DDP, the same losses up to rounding."""

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


def launches_of(run_name: str) -> str:
    """The MLflow filter for the `raylm pretrain` runs of a run.name."""
    return f"tags.`raylm.run_name` = '{run_name}' and tags.`raylm.stage` = 'pretrain'"


def losses(tmp, run_name: str) -> list[dict[int, float]]:
    """Per `raylm pretrain` launch of run.name `run_name`, oldest first: step -> train loss."""
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("raylm").experiment_id],
                              filter_string=launches_of(run_name), order_by=["start_time ASC"])
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
    # Relaunched with the budget still spent: nothing more is trained.
    assert pretrain(tmp, "stopped", [f"train.max_tokens={STOP * TOKENS_PER_STEP}"]) == 0
    assert sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()) == [f"checkpoint_{STOP:06d}"]
    assert pretrain(tmp, "stopped") == 0  # the same run name resumes from that checkpoint
    first, idle, second = losses(tmp, "stopped")
    assert idle == {}
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
                                filter_string=launches_of("killed"))
    every = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert all(value == reference[step] for step, value in every)


@pytest.mark.slow  # ~35 s, moved out to keep CI under 30 minutes; `pytest -m slow`
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


@pytest.mark.slow  # a scale run (~65 s); `pytest -m slow`
def test_resume_on_fewer_workers_continues_at_the_same_sequence(straight, capfd):
    """Stopped on 2 workers, relaunched elastic (1 to 2 workers of 2 CPUs each on a 2-CPU
    cluster, so 1 fits): the one worker accumulates 2 micro-batches per step where 2 workers
    took one each. The batches are the same sequences, so the losses equal the straight run's
    up to summation order; a skipped or repeated batch would move them by about 1e-2."""
    tmp, reference = straight
    assert pretrain(tmp, "resized", [f"train.max_tokens={STOP * TOKENS_PER_STEP}"]) == 0
    capfd.readouterr()
    assert pretrain(tmp, "resized", ["scaling.min_workers=1", "scaling.cpus_per_worker=2"]) == 0
    assert f"at step {STOP} with 1 workers (saved by 2)" in capfd.readouterr().out
    first, second = losses(tmp, "resized")
    assert sorted(second) == list(range(STOP + 1, STEPS + 1))
    assert {**first, **second} == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow  # a scale run (~70 s), moved out to keep CI under 30 minutes; `pytest -m slow`
def test_fsdp_trains_like_ddp_and_its_checkpoint_resumes_under_ddp(straight):
    """FSDP2 shards the same model over the same 2 workers: the same losses up to the order of
    its reduce-scatter sums. Checkpoints hold whole tensors by name, so DDP resumes them."""
    tmp, reference = straight
    assert pretrain(tmp, "sharded", ["scaling.strategy=fsdp", f"train.max_tokens={STOP * TOKENS_PER_STEP}"]) == 0
    assert pretrain(tmp, "sharded", ["scaling.strategy=ddp"]) == 0
    sharded, resumed = losses(tmp, "sharded")
    assert sorted(sharded) == list(range(1, STOP + 1)) and sorted(resumed) == list(range(STOP + 1, STEPS + 1))
    assert {**sharded, **resumed} == pytest.approx(reference, rel=1e-5)


def test_sigterm_checkpoints_stops_and_the_relaunch_continues(straight, ray_cluster):
    """SIGTERM to the driver (what `ray job stop` and a pod eviction send): the workers stop
    at the end of the step with a checkpoint, the command exits 143, the MLflow run ends
    KILLED, and the same command continues bit for bit."""
    import re
    import signal
    import subprocess
    import sys
    import time

    import ray

    from raylm.pipelines.checkpoint import torn_reason

    tmp, reference = straight
    overrides = [*tiny_overrides(tmp), "run.name=terminated", f"train.max_steps={STEPS}", "train.log_interval=1",
                 "train.eval_interval=100", "train.checkpoint_interval=2", "train.warmup_steps=3"]
    command = [sys.executable, "-m", "raylm", "pretrain", str(REPO / "configs" / "quickstart.yaml"),
               "--address", ray.get_runtime_context().gcs_address, *[x for o in overrides for x in ("--set", o)]]
    log = tmp / "terminated.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
        # The files, not the log lines: Ray forwards worker output to the driver a second late.
        marker = tmp / "runs" / "train" / "terminated" / "checkpoint_000002" / "COMMIT.json"
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        print(f"[test] sent SIGTERM to the driver (pid {proc.pid}) after checkpoint_000002")
        code = proc.wait(timeout=120)
    text = log.read_text()
    assert code == 143, text[-3000:]
    assert "SIGTERM received" in text and "run the same command again to resume" in text
    stopped = int(re.search(r"stopped at step (\d+)", text).group(1))
    print(f"[test] the workers stopped at step {stopped} of {STEPS}")
    assert 2 <= stopped < STEPS
    assert torn_reason(tmp / "runs" / "train" / "terminated" / f"checkpoint_{stopped:06d}") is None
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raylm").experiment_id],
                                filter_string=launches_of("terminated"))
    assert run.info.status == "KILLED"

    assert pretrain(tmp, "terminated", ["train.checkpoint_interval=2"]) == 0
    first, second = losses(tmp, "terminated")
    assert sorted({**first, **second}) == list(range(1, STEPS + 1))
    assert {**first, **second} == reference
