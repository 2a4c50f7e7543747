"""The fault suite, on real Ray (Data, Train), a real MLflow store and a real `mlflow server`:
each test injects one fault, prints what it injected and what survived.

Exact resume: a run stopped by its token budget, by SIGTERM, by a SIGKILLed worker or driver,
or resumed past a torn checkpoint, gives the same per-step losses as a run that never stopped;
with another worker count or FSDP instead of DDP, the same losses up to rounding. A Ray Data
worker killed during prepare changes nothing in its output; an MLflow server outage costs the
training loop nothing."""

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from mlflow.tracking import MlflowClient

from raylm.cli import main
from raylm.pipelines.train.checkpoint import torn_reason
from tests.conftest import REPO, tiny_overrides

STEPS, STOP = 16, 6
TOKENS_PER_STEP = 16 * 64  # train.batch_size x data.seq_len of tiny_overrides


def cli(command: str, tmp, overrides: list[str]) -> int:
    args = [*tiny_overrides(tmp), *overrides]
    return main([command, str(REPO / "configs" / "quickstart.yaml"), *[x for o in args for x in ("--set", o)]])


def pretrain(tmp, name: str, extra: list[str] = ()) -> int:
    return cli(
        "pretrain",
        tmp,
        [
            f"run.name={name}",
            f"train.max_steps={STEPS}",
            "train.log_interval=1",
            "train.eval_interval=100",
            "train.checkpoint_interval=100",
            "train.warmup_steps=3",
            *extra,
        ],
    )


def wait_for(path, seconds: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Until `path` exists (a checkpoint's COMMIT.json: files, not log lines, which Ray forwards
    from the workers a second late); fails if it takes longer or `proc` exits first."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        tail = log.read_text()[-3000:] if log else ""
        assert time.monotonic() < deadline, f"{path} did not appear within {seconds} s\n{tail}"
        assert proc is None or proc.poll() is None, (
            f"the driver exited ({proc.returncode}) before {path} appeared\n{tail}"
        )
        time.sleep(0.02)


def driver_command(overrides: list[str]) -> list[str]:
    """`raylm pretrain` as a process of its own, joining this suite's Ray instance."""
    import ray

    return [
        sys.executable,
        "-m",
        "raylm",
        "pretrain",
        str(REPO / "configs" / "quickstart.yaml"),
        "--address",
        ray.get_runtime_context().gcs_address,
        *[x for o in overrides for x in ("--set", o)],
    ]


# raylm's local instance listens on 127.0.0.1 with Ray's token auth (pipelines/runtime.py): a
# process joining it sends the token and keeps Ray from rewriting 127.0.0.1 to the host's IP.
DRIVER_ENV = os.environ | {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def start_driver(tmp, name: str) -> tuple[subprocess.Popen, Path]:
    """`raylm pretrain` of run `name` as pretrain() runs it, with a checkpoint every 2 steps, in
    a process of its own (to be killed), writing to <tmp>/<name>.log."""
    overrides = [
        *tiny_overrides(tmp),
        f"run.name={name}",
        f"train.max_steps={STEPS}",
        "train.log_interval=1",
        "train.eval_interval=100",
        "train.checkpoint_interval=2",
        "train.warmup_steps=3",
    ]
    log = tmp / f"{name}.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            driver_command(overrides), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=DRIVER_ENV
        )
    return proc, log


def resumed_step(out: str, run_name: str) -> int:
    """The step the workers of `run_name` resumed at. By run name: Ray forwards workers' output
    to the driver a second or more late, so another test's "resumed from" line may land here."""
    return int(re.search(rf"resumed from \S+/{run_name}/checkpoint_\d+ at step (\d+)", out).group(1))


def launches_of(run_name: str) -> str:
    """The MLflow filter for the `raylm pretrain` runs of a run.name."""
    return f"tags.`raylm.run_name` = '{run_name}' and tags.`raylm.stage` = 'pretrain'"


def losses(tmp, run_name: str) -> list[dict[int, float]]:
    """Per `raylm pretrain` launch of run.name `run_name`, oldest first: step -> train loss."""
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("raylm").experiment_id],
        filter_string=launches_of(run_name),
        order_by=["start_time ASC"],
    )
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


def test_background_saves_resume_bit_for_bit(straight):
    """train.async_save: checkpoints written while the next steps train (every 2 steps here, so
    most are reported a step or more after they were taken) and the final one after the loop;
    the relaunch resumes from the last and logs the uninterrupted run's losses exactly."""
    tmp, reference = straight
    background = ["train.async_save=true", "train.checkpoint_interval=2"]
    assert pretrain(tmp, "async", [*background, f"train.max_tokens={STOP * TOKENS_PER_STEP}"]) == 0
    run_dir = tmp / "runs" / "train" / "async"
    kept = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert [p.name for p in kept] == [f"checkpoint_{s:06d}" for s in (STOP - 2, STOP)]
    assert all(torn_reason(p) is None for p in kept)
    assert pretrain(tmp, "async", background) == 0
    first, second = losses(tmp, "async")
    assert sorted(second) == list(range(STOP + 1, STEPS + 1))
    assert {**first, **second} == reference


def test_torn_checkpoint_is_skipped_for_the_previous_one(straight, capfd):
    tmp, reference = straight
    assert pretrain(tmp, "torn", ["train.checkpoint_interval=8"]) == 0
    checkpoint = tmp / "runs" / "train" / "torn" / "checkpoint_000016"
    path = sorted(checkpoint.glob("state/shard-00002-*.safetensors"))[0]  # the second rank's first file
    shard = path.relative_to(checkpoint).as_posix()
    path.write_bytes(path.read_bytes()[:1000])  # its upload cut short
    print(f"[fault] cut {path} to 1000 bytes")
    capfd.readouterr()
    assert pretrain(tmp, "torn") == 0
    out = capfd.readouterr().out
    assert "skipping" in out and f"checkpoint_000016: torn ({shard} has 1000 bytes" in out
    _, resumed = losses(tmp, "torn")
    assert sorted(resumed) == list(range(9, STEPS + 1))  # from checkpoint_000008
    assert resumed == {step: reference[step] for step in resumed}
    print("[fault] survived: the torn checkpoint_000016 was skipped with a log line; resumed from checkpoint_000008")


def test_worker_sigkilled_at_a_random_step_resumes_from_the_last_checkpoint(straight, capfd):
    """SIGKILL one training worker at a random step between 30% and 70% of the run: Ray Train
    (scaling.max_failures=1) restarts the worker group from the last checkpoint written before
    the kill, and every logged loss, before and after, equals the uninterrupted run's."""
    import ray
    from ray.util.state import list_actors

    from raylm.pipelines.train.checkpoint import whole_checkpoints

    tmp, reference = straight
    seed = int(os.environ.get("RAYLM_FAULT_SEED", random.randrange(10_000)))
    kill_after = random.Random(seed).randint(int(0.3 * STEPS), int(0.7 * STEPS))  # steps 4..11 of 16
    # A checkpoint every step slows the run enough (Ray's report per step) to kill it midway.
    results: list[int] = []
    job = threading.Thread(
        target=lambda: results.append(
            pretrain(tmp, "killed", ["train.checkpoint_interval=1", "scaling.max_failures=1"])
        )
    )
    job.start()
    run_dir = tmp / "runs" / "train" / "killed"
    wait_for(run_dir / "checkpoint_000001" / "COMMIT.json", 120)
    # The state API takes ~1 s: ask it now, so that the kill follows the chosen step at once.
    workers = list_actors(
        address=ray.get_runtime_context().gcs_address,
        detail=True,  # not another Ray on this host
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    victim = max(w.pid for w in workers)
    wait_for(run_dir / f"checkpoint_{kill_after:06d}" / "COMMIT.json", 120)
    os.kill(victim, signal.SIGKILL)
    last = whole_checkpoints(run_dir)[-1].name
    injected = (
        f"[fault] seed {seed}: SIGKILLed training worker pid {victim} after checkpoint_{kill_after:06d} "
        f"(last whole checkpoint at the kill: {last})"
    )
    job.join(timeout=300)
    assert results == [0]
    out = capfd.readouterr().out
    print(injected)
    resumed = resumed_step(out, "killed")
    assert resumed >= int(last.split("_")[1]), f"resumed at step {resumed}, before the last checkpoint {last}"
    (history,) = losses(tmp, "killed")  # steps after the last checkpoint appear twice: run, rerun
    assert sorted(history) == list(range(1, STEPS + 1))
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("raylm").experiment_id], filter_string=launches_of("killed")
    )
    every = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert all(value == reference[step] for step, value in every)
    assert run.info.status == "FINISHED"
    print(
        f"[fault] survived: resumed at step {resumed}, 0 steps lost beyond the last checkpoint, "
        f"{len(every)} logged losses all equal to the uninterrupted run's, run FINISHED"
    )


def test_driver_sigkilled_then_relaunched_continues_from_its_checkpoint(straight, ray_cluster, capfd):
    """SIGKILL the driver (`raylm pretrain`, a process of its own): its Ray job dies with it and
    its MLflow run is left RUNNING. The same command again resumes from the last checkpoint,
    marks the orphaned run KILLED, and the losses equal the uninterrupted run's."""
    tmp, reference = straight
    proc, log = start_driver(tmp, "orphaned")
    wait_for(tmp / "runs" / "train" / "orphaned" / "checkpoint_000006" / "COMMIT.json", 120, proc, log)
    proc.kill()
    proc.wait(timeout=30)
    print(f"[fault] SIGKILLed the driver (pid {proc.pid}) after checkpoint_000006")
    capfd.readouterr()
    assert pretrain(tmp, "orphaned", ["train.checkpoint_interval=2"]) == 0
    out = capfd.readouterr().out
    resumed = resumed_step(out, "orphaned")
    assert resumed >= 6 and "was left RUNNING by a driver that died: marked KILLED" in out
    first, second = losses(tmp, "orphaned")
    assert sorted(second) == list(range(resumed + 1, STEPS + 1))
    assert {**first, **second} == reference
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("raylm").experiment_id],
        filter_string=launches_of("orphaned"),
        order_by=["start_time ASC"],
    )
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    assert runs[0].data.tags["raylm.end_reason"].startswith("its driver died")
    print(
        f"[fault] survived: the relaunch resumed at step {resumed}; the orphaned run is KILLED, the new one FINISHED; "
        "losses equal the uninterrupted run's"
    )


@pytest.mark.slow  # ~35 s
def test_resume_path_starts_a_new_run_from_another_runs_checkpoint(straight, capsys):
    tmp, _ = straight
    source = tmp / "runs" / "train" / "straight" / f"checkpoint_{STEPS:06d}"
    args = ["pretrain", str(REPO / "configs" / "quickstart.yaml"), "--resume", str(source)]
    overrides = [
        *tiny_overrides(tmp),
        "run.name=branch",
        "train.max_steps=20",
        "train.log_interval=1",
        "train.eval_interval=100",
        "train.checkpoint_interval=100",
        "train.warmup_steps=3",
    ]
    assert main([*args, *[x for o in overrides for x in ("--set", o)]]) == 0
    (continued,) = losses(tmp, "branch")
    assert sorted(continued) == [17, 18, 19, 20]  # on from the other run's step 16
    bigger = [*overrides, "model.n_embd=128", "run.name=other"]
    assert main([*args, *[x for o in bigger for x in ("--set", o)]]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow  # a scale run (~65 s)
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


@pytest.mark.slow  # a scale run (~70 s)
def test_fsdp_trains_like_ddp_and_its_checkpoint_resumes_under_ddp(straight):
    """FSDP2 shards the same model over the same 2 workers: the same losses up to the order of
    its reduce-scatter sums. Checkpoints hold whole tensors by name, so DDP resumes them."""
    tmp, reference = straight
    assert pretrain(tmp, "sharded", ["scaling.strategy=fsdp", f"train.max_tokens={STOP * TOKENS_PER_STEP}"]) == 0
    assert pretrain(tmp, "sharded", ["scaling.strategy=ddp"]) == 0
    sharded, resumed = losses(tmp, "sharded")
    assert sorted(sharded) == list(range(1, STOP + 1)) and sorted(resumed) == list(range(STOP + 1, STEPS + 1))
    assert {**sharded, **resumed} == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow  # ~2 min: two launches on 2 FSDP workers, an evaluation and an export from the bucket
def test_checkpoints_on_s3_rotate_skip_torn_resume_evaluate_and_export(straight, s3_endpoint, monkeypatch, capfd):
    """run.checkpoint_dir on S3 (moto's server on 127.0.0.1, reached through pyarrow as AWS or
    MinIO would be): 2 FSDP workers checkpoint every 2 steps into the bucket and keep the last 2;
    the newest, torn by a deleted shard, is skipped; the relaunch resumes from the bucket, each
    rank reading about half of the shard bytes, and continues the straight run's losses;
    evaluate and export-hf read the last checkpoint from its URI as they read a local copy."""
    from raylm.pipelines.eval.evaluate import evaluate
    from raylm.storage import locate

    tmp, reference = straight
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, allow_bucket_creation=True)
    fs.create_dir("raylm-ckpt")
    bucket = [
        "run.checkpoint_dir=s3://raylm-ckpt/runs",
        "scaling.strategy=fsdp",
        "train.checkpoint_interval=2",
        "train.keep_checkpoints=2",
    ]
    assert pretrain(tmp, "bucket", [*bucket, f"train.max_tokens={STOP * TOKENS_PER_STEP}"]) == 0
    run = locate("s3://raylm-ckpt/runs/bucket")
    assert [c.name for c in run.subdirs("checkpoint_*")] == [f"checkpoint_{STOP - 2:06d}", f"checkpoint_{STOP:06d}"]
    newest = run / f"checkpoint_{STOP:06d}"
    shard = (newest / "state").glob("shard-00001-*")[0]
    fs.delete_file(shard.path)
    print(f"[fault] deleted {shard} from the bucket")
    capfd.readouterr()

    assert pretrain(tmp, "bucket", bucket) == 0
    out = capfd.readouterr().out
    assert f"skipping {newest}: torn (state/{shard.name} is missing)" in out
    assert resumed_step(out, "bucket") == STOP - 2
    reads = re.findall(r"resumed from s3://raylm-ckpt/\S+ at step \d+ .*; this rank read ([\d,]+) of the ([\d,]+)", out)
    shares = [int(got.replace(",", "")) / int(stored.replace(",", "")) for got, stored in reads]
    print(f"[fault] survived: resumed from the bucket at step {STOP - 2}; each rank read {shares} of the shard bytes")
    assert len(shares) == 2 and all(0.4 < share < 0.6 for share in shares), shares
    first, second = losses(tmp, "bucket")
    assert {**first, **second} == pytest.approx(reference, rel=1e-5)
    # Ray Train rotated across both launches, the torn one included; step 6 was rewritten as 6.1.
    assert [c.name for c in run.subdirs("checkpoint_*")] == [f"checkpoint_{STEPS - 2:06d}", f"checkpoint_{STEPS:06d}"]

    last = run / f"checkpoint_{STEPS:06d}"
    copy = tmp / "bucket-copy"
    pafs.copy_files(last.path, str(copy), source_filesystem=fs)
    (split,) = (tmp / "runs" / "data").glob("*/val")
    assert evaluate(last, split, 32 * 64) == evaluate(copy, split, 32 * 64)  # 32 windows
    for source, name in ((str(last), "hf-from-s3"), (str(copy), "hf-from-disk")):
        assert main(["export-hf", "--checkpoint", source, "--out", str(tmp / name)]) == 0
    exported = [(tmp / name / "model.safetensors").read_bytes() for name in ("hf-from-s3", "hf-from-disk")]
    assert exported[0] == exported[1]


def test_sigterm_checkpoints_stops_and_the_relaunch_continues(straight, ray_cluster):
    """SIGTERM to the driver (what `ray job stop` sends), here from the head pod's preStop hook
    as an eviction runs it (cluster/prestop.py, the process a pod would start): the workers
    stop at the end of the step with a checkpoint, the hook returns once the driver has exited,
    the command exits 143, the MLflow run ends KILLED, and the same command continues bit for bit."""

    tmp, reference = straight
    proc, log = start_driver(tmp, "terminated")
    wait_for(tmp / "runs" / "train" / "terminated" / "checkpoint_000002" / "COMMIT.json", 120, proc, log)
    hook = [sys.executable, "-m", "raylm.cluster.prestop", "--timeout", "120", "--under", str(os.getpid())]
    stopped_by = subprocess.run(hook, capture_output=True, text=True, timeout=150, cwd=REPO)
    print(f"[fault] the preStop hook after checkpoint_000002: {stopped_by.stdout.strip()}")
    assert f"SIGTERM to raylm driver(s) [{proc.pid}]" in stopped_by.stdout and not stopped_by.stderr
    assert proc.poll() is not None  # the hook waited for the driver to exit
    code = proc.wait(timeout=10)
    text = log.read_text()
    assert code == 143, text[-3000:]
    assert "SIGTERM received" in text and "run the same command again to resume" in text
    stopped = int(re.search(r"stopped at step (\d+)", text).group(1))
    print(f"[fault] survived: the workers stopped at step {stopped} of {STEPS} with a checkpoint; run KILLED")
    assert 2 <= stopped < STEPS
    assert torn_reason(tmp / "runs" / "train" / "terminated" / f"checkpoint_{stopped:06d}") is None
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("raylm").experiment_id], filter_string=launches_of("terminated")
    )
    assert run.info.status == "KILLED"

    assert pretrain(tmp, "terminated", ["train.checkpoint_interval=2"]) == 0
    first, second = losses(tmp, "terminated")
    assert sorted({**first, **second}) == list(range(1, STEPS + 1))
    assert {**first, **second} == reference


def descendants(root: int) -> set[int]:
    """Every process under `root` (the session's Ray instance runs under this test process)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def kill_first_task(prefix: str, seconds: float) -> str | None:
    """SIGKILL the first worker process of this Ray instance whose title (Ray sets it to
    `ray::<task>` while one runs) starts with `prefix`; returns that title."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for pid in descendants(os.getpid()):
            try:
                title = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode()
            except OSError:
                continue
            if title.startswith(prefix):
                os.kill(pid, signal.SIGKILL)
                return f"pid {pid} {title}"
        time.sleep(0.01)
    return None


def prepared_content(output_dir) -> dict[str, str]:
    """Every file of the prepared data that depends on the input (shards, tokenizer, split
    statistics), by content hash; timings and paths left out."""
    (data_dir,) = (output_dir / "data").iterdir()
    files = {
        str(p.relative_to(data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(data_dir.rglob("*.npy")) + [data_dir / "tokenizer.json"]
    }
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return files | {"splits": json.dumps(manifest["splits"], sort_keys=True)}


def test_ray_data_worker_killed_during_prepare_changes_nothing(straight, capfd):
    """SIGKILL the Ray Data worker reading and cleaning the corpus, mid-task: Ray retries the
    task, and the shards, tokenizer and split statistics are identical to the clean run's."""
    tmp, _ = straight
    faulty = tmp / "faulty"
    results: list[int] = []
    job = threading.Thread(target=lambda: results.append(cli("prepare", tmp, [f"run.output_dir={faulty}"])))
    job.start()
    killed = kill_first_task("ray::MapBatches(_parse_files)", 120)
    print(f"[fault] SIGKILLed the Ray Data worker {killed}")
    job.join(timeout=300)
    assert killed, "no Ray Data task to kill was seen"
    assert results == [0]
    clean, after = prepared_content(tmp / "runs"), prepared_content(faulty)
    assert after == clean
    print(
        f"[fault] survived: the task was retried; {len(after) - 1} prepared files and the split statistics "
        "are identical to the clean run's"
    )


SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "zqx-aws-secret-not-for-logs",
    "HF_TOKEN": "hf_zqxTokenNotForLogs",
    "RAYLM_API_KEY": "zqx-api-key-not-for-logs",
}
PASSWORD = "zqx-mlflow-password-not-for-logs"


def test_mlflow_server_outage_costs_training_nothing_and_no_secret_is_logged(straight, ray_cluster, tmp_path):
    """A real `mlflow server` stops after step 4 and comes back after step 12 (8 steps trained
    without it): the run goes on, every step's metrics arrive after the outage, the run ends
    FINISHED. The same run carries fake secrets in the driver's environment and the tracking
    URI's password: none of them appears in a param, tag, artifact or log line."""
    from tests.mlflow_server import MlflowServer

    tmp, _ = straight
    server = MlflowServer(tmp_path).start()
    uri = f"http://raylm:{PASSWORD}@127.0.0.1:{server.port}"
    steps = 24
    overrides = [
        *[o for o in tiny_overrides(tmp) if not o.startswith("tracking.")],
        f"tracking.tracking_uri={uri}",
        "run.name=outage",
        f"train.max_steps={steps}",
        "train.log_interval=1",
        "train.eval_interval=100",
        "train.checkpoint_interval=4",
        "train.warmup_steps=3",
    ]
    command = driver_command(overrides)
    log = tmp_path / "driver.log"
    run_dir = tmp / "runs" / "train" / "outage"
    try:
        with log.open("w") as sink:
            proc = subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=DRIVER_ENV | SECRETS)
            wait_for(run_dir / "checkpoint_000004" / "COMMIT.json", 120, proc, log)
            server.stop()
            print(f"[fault] stopped the MLflow server at {server.url} after checkpoint_000004")
            wait_for(run_dir / "checkpoint_000012" / "COMMIT.json", 120, proc, log)
            server.start()
            print("[fault] started it again after checkpoint_000012")
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "could not log metrics" in text and "answers again" in text and "could not be delivered" not in text
        client = MlflowClient(server.url)
        (run,) = client.search_runs(
            [client.get_experiment_by_name("raylm").experiment_id], filter_string=launches_of("outage")
        )
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(1, steps + 1))
        step_time = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "step_time_s")}
        print(
            f"[fault] survived: all {steps} steps' train_loss delivered, run FINISHED; seconds per step "
            f"{mean(step_time, 2, 4):.3f} before the outage, {mean(step_time, 5, 12):.3f} during it, "
            f"{mean(step_time, 13, steps):.3f} after it"
        )
        leaks = secret_leaks(client, run, [text, *ray_session_logs()], tmp_path / "artifacts-copy")
        assert not leaks, leaks
        print(
            f"[fault] no secret in {len(run.data.params)} params, {len(run.data.tags)} tags, the artifacts, "
            "the driver's output or the Ray session logs"
        )
    finally:
        server.stop()


def mean(by_step: dict[int, float], first: int, last: int) -> float:
    """The mean of a per-step metric over steps first..last (step_time_s leaves out checkpoint
    and evaluation time: the training loop's own pace)."""
    return sum(by_step[s] for s in range(first, last + 1)) / (last - first + 1)


def secret_leaks(client: MlflowClient, run, logs: list[str], download_to) -> list[str]:
    """Where any of SECRETS or PASSWORD shows up: params, tags, artifact files, log texts."""
    secrets = [*SECRETS.values(), PASSWORD]
    places = {f"param {k}": v for k, v in run.data.params.items()} | {f"tag {k}": v for k, v in run.data.tags.items()}
    local = client.download_artifacts(run.info.run_id, "", str(download_to))
    places |= {
        f"artifact {p.name}": p.read_bytes().decode("utf-8", "replace") for p in Path(local).rglob("*") if p.is_file()
    }
    places |= {f"log {i}": text for i, text in enumerate(logs)}
    return [f"{secret!r} in {where}" for where, text in places.items() for secret in secrets if secret in text]


def ray_session_logs() -> list[str]:
    """The text of this Ray instance's log files (workers' output included)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return [p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000]


def test_mlflow_server_out_at_the_run_s_end_costs_the_job_nothing_and_the_next_command_delivers(
    straight, ray_cluster, tmp_path, monkeypatch, capfd
):
    """The `mlflow server` stops after training, just before the driver logs model/, plots/,
    the final metrics and the FINISHED status: the command still exits 0 and says what was not
    delivered, which waits in <run.output_dir>/mlflow_pending/ (no password in it). With the
    server back on the same port, the next command on the run (`raylm evaluate`) delivers it:
    the first run is FINISHED, with its model, loss curve and final metrics."""
    import raylm.pipelines.jobs as jobs
    from tests.mlflow_server import MlflowServer

    tmp, _ = straight
    server = MlflowServer(tmp_path).start()
    uri = f"http://raylm:{PASSWORD}@127.0.0.1:{server.port}"
    steps = 4
    overrides = [
        *[o for o in tiny_overrides(tmp) if not o.startswith("tracking.")],
        f"tracking.tracking_uri={uri}",
        "run.name=outage-at-end",
        f"train.max_steps={steps}",
        "train.log_interval=1",
        "train.eval_interval=100",
        "train.checkpoint_interval=100",
        "train.warmup_steps=1",
        "eval.max_tokens=128",  # 2 windows of 64
        "eval.sample_tokens=0",
    ]
    trained = jobs.log_trained

    def stop_then_log(*args, **kwargs):
        server.stop()
        print(
            f"[fault] stopped the MLflow server at {server.url} after training, before the driver's end-of-run logging"
        )
        return trained(*args, **kwargs)

    run_config = str(REPO / "configs" / "quickstart.yaml")
    args = [x for o in overrides for x in ("--set", o)]
    pending = tmp / "runs" / "mlflow_pending"
    try:
        monkeypatch.setattr(jobs, "log_trained", stop_then_log)
        started = time.monotonic()
        assert main(["pretrain", run_config, *args]) == 0
        print(f"[fault] the pretrain command exited 0 in {time.monotonic() - started:.0f} s without its server")
        monkeypatch.setattr(jobs, "log_trained", trained)
        out = capfd.readouterr()
        text = out.out + out.err
        (line,) = [x for x in text.splitlines() if "did not answer at the end of run" in x]
        assert "not delivered: model/, plots/ (the loss curve), " in line and "status FINISHED" in line, line
        assert PASSWORD not in text
        (file,) = pending.glob("*.json")
        assert PASSWORD not in file.read_text() and json.loads(file.read_text())["status"] == "FINISHED"
        report = [x for x in text.splitlines() if x.startswith("[fault]")] + [f"[fault] said: {line.strip()}"]

        server.start()
        client = MlflowClient(server.url)
        (run,) = client.search_runs(
            [client.get_experiment_by_name("raylm").experiment_id], filter_string=launches_of("outage-at-end")
        )
        assert run.info.status == "RUNNING"
        assert main(["evaluate", run_config, *args]) == 0
        delivered = capfd.readouterr().out
        assert f"delivered to run {run.info.run_id[:8]}" in delivered
        report += [x for x in delivered.splitlines() if x.startswith("[mlflow] delivered")]
        run = client.get_run(run.info.run_id)
        assert run.info.status == "FINISHED"
        assert {"pretrain_seconds", "total_seconds"} <= set(run.data.metrics)
        assert {f.path for f in client.list_artifacts(run.info.run_id)} >= {"model", "plots"}
        assert [f.path for f in client.list_artifacts(run.info.run_id, "plots")] == ["plots/loss.png"]
        assert not list(pending.glob("*.json"))
        report.append("[fault] survived: the next command delivered model/, plots/ and the final metrics; FINISHED")
        print("\n".join(report))
    finally:
        server.stop()
