"""Autoscaling check without Kubernetes: Ray's fake multi-node provider (the one Ray's own
autoscaler tests use) launches "worker nodes" as local raylets. A head with 0 CPUs (as in
cluster/: KubeRay head with num-cpus "0") and a CPU worker type with 0..2 nodes; a job that
asks for 2 x 1 CPU makes the autoscaler add 2 workers, and once the job is done the idle
workers are removed (idle_timeout_minutes 0.1 in tests/fake_autoscaler.yaml).

Cases:
- v1-pg: the default (v1) autoscaler; the job holds a placement group of 2 x {CPU: 1} (the
  shape of a 2-worker Ray Train job) with one actor per bundle.
- v2-pg: the same with autoscaler v2 (RAY_enable_autoscaler_v2=1), which is what
  cluster/manifests.py asks KubeRay for (autoscalerOptions.version: v2).
- v2-train: v2 with a tiny real TorchTrainer (2 workers x 1 CPU, 5 DDP steps).

Ray 2.60's wheel lacks fake_multi_node/example.yaml, which the v2 monitor loads as the
provider's defaults (v1 does not), so the v2 monitor that `ray start` launches exits at once
with FileNotFoundError and `ray start --block` then stops the head. For v2 the test starts the
head with `--no-monitor` (as KubeRay does, its autoscaler runs in a separate container) and
runs Ray's v2 monitor itself with that defaults lookup pointed at our config. Everything else
is stock Ray.

Isolation from other Ray instances on the machine: free ports, our own --temp-dir, our own
auth token, and cleanup by process group plus a marker variable in the environment of every
process we start (never `ray stop`). Slow (55-130 s per case).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).with_name("fake_autoscaler.yaml")
FAKE_HEAD_ID = "f" * 51 + "00000"  # the fake provider's fixed head node id (v2 needs it)
MARKER = "RAYLM_AUTOSCALE_TEST"  # env var set on every process we start; cleanup key
UP_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300
DOWN_TIMEOUT_S = 120

# The job's entrypoints. Each prints one line "NODES <json list of node ids>": where its two
# 1-CPU workers ran.
PG_JOB = """
import json, time, ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
ray.init()
pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")  # as Ray Train asks
ray.get(pg.ready())
@ray.remote(num_cpus=1)
class Worker:
    def run(self):
        time.sleep(3)
        return ray.get_runtime_context().get_node_id()
ws = [Worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote() for i in range(2)]
print("NODES", json.dumps(ray.get([w.run.remote() for w in ws])), flush=True)
"""

TRAIN_JOB = """
import json, pathlib, tempfile
import ray, ray.train, torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model
out = pathlib.Path(tempfile.mkdtemp())  # every fake node is on this machine: a shared disk
def loop(cfg):
    torch.manual_seed(0)
    model = prepare_model(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 4)
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        opt.zero_grad(); loss.backward(); opt.step()
    rank = ray.train.get_context().get_world_rank()
    (pathlib.Path(cfg["out"]) / f"rank{rank}").write_text(ray.get_runtime_context().get_node_id())
    ray.train.report({"loss": loss.item()})
trainer = TorchTrainer(loop, train_loop_config={"out": str(out)},
                       scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                       run_config=RunConfig(storage_path=str(out / "storage"), name="autoscale"))
result = trainer.fit()
assert result.error is None, result.error
print("NODES", json.dumps([(out / f"rank{r}").read_text() for r in range(2)]), flush=True)
"""

# Runs beside the test: connects as a driver and prints, every 0.5 s, a JSON line with the
# alive worker nodes (all but the head) and the job's status. A separate process because the
# test session may already hold its own local Ray instance.
OBSERVER = """
import json, sys, time, ray
from ray.job_submission import JobSubmissionClient
gcs, dashboard, sid = sys.argv[1:4]
ray.init(address=gcs, logging_level="ERROR", log_to_driver=False)
client = JobSubmissionClient(dashboard)
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    workers = sorted(n["NodeID"] for n in nodes if "node:__internal_head__" not in n["Resources"])
    try:
        status = str(client.get_job_status(sid).value)
    except Exception:
        status = None
    print(json.dumps({"t": time.time(), "workers": workers, "job": status}), flush=True)
    time.sleep(0.5)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    import ray._private.services as services

    return services.get_node_ip_address()  # what `ray start --head` binds the GCS to


def marked_pids(token: str) -> list[int]:
    """Pids of live processes whose environment carries MARKER=token: ours, and only ours."""
    needle = f"{MARKER}={token}".encode()
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if needle in (p / "environ").read_bytes().split(b"\0"):
                state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(p.name))
        except OSError:
            pass
    return pids


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class FakeAutoscalingCluster:
    """A head started with RAY_FAKE_CLUSTER=1 and the fake_multinode autoscaling config."""

    def __init__(self, version: str):
        assert version in ("v1", "v2")
        self.version = version
        self.tmp = Path(tempfile.mkdtemp(prefix="rasc-", dir="/tmp"))  # short: socket paths
        self.token = self.tmp.name
        self.ip = node_ip()
        self.gcs = f"{self.ip}:{free_port()}"
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.groups: list[int] = []
        venv_bin = str(Path(sys.executable).parent)  # the job's `python` comes from this PATH
        self.env = {
            **os.environ,
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            MARKER: self.token,
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # default 5 s between autoscaler rounds
            "AUTOSCALER_METRIC_PORT": str(free_port()),  # 44217 may belong to another head
            # Token auth, as KubeRay's authOptions.mode: token: a per-test token, like the
            # Secret KubeRay injects, instead of the shared ~/.ray/auth_token.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
        }
        for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            self.env.pop(var, None)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(Path(sys.executable).parent / "ray"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> None:
        cfg = yaml.safe_load(CONFIG.read_text())
        cfg["provider"]["gcs_address"] = self.gcs  # else new nodes join <ip>:6379
        head_env = dict(self.env)
        if self.version == "v2":  # what AutoscalingCluster(autoscaler_v2=True) sets
            cfg["provider"].update(launch_multiple=True, head_node_id=FAKE_HEAD_ID)
            head_env.update(
                RAY_enable_autoscaler_v2="1",
                RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_ID,
                RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_ID,
                RAY_NODE_TYPE_NAME="ray.head.default",
            )  # v2 asserts a head type
            self.env["RAY_enable_autoscaler_v2"] = "1"
        self.config = self.tmp / "autoscaler.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--num-cpus=0",
            f"--port={self.gcs.rsplit(':', 1)[1]}",
            f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
            "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={self.tmp / 'ray'}",
            "--object-store-memory=200000000",
            f"--autoscaling-config={self.config}",
            "--disable-usage-stats",
            "--block",
        ]  # --block: SIGTERM to it stops its children
        if self.version == "v2":
            cmd.append("--no-monitor")  # as KubeRay does: the autoscaler runs beside the head
        head = subprocess.Popen(
            cmd, env=head_env, start_new_session=True, stdout=open(self.tmp / "head.out", "w"), stderr=subprocess.STDOUT
        )
        self.groups.append(head.pid)  # session leader: its pid is the process group id
        self.head = head
        deadline = time.time() + 120
        while "Ray runtime started" not in (self.tmp / "head.out").read_text():
            assert head.poll() is None and time.time() < deadline, (self.tmp / "head.out").read_text()[-3000:]
            time.sleep(0.5)
        if self.version == "v2":
            self._start_v2_monitor()
        self._wait_ready()

    def _start_v2_monitor(self) -> None:
        """Ray's v2 autoscaler monitor in its own process, as KubeRay's autoscaler container
        runs it. Its FileConfigReader fills in defaults from the provider's example.yaml,
        which the 2.60 wheel does not ship (FileNotFoundError); point that lookup at our
        config instead (every key is ours anyway)."""
        import ray

        monitor = Path(ray.__file__).parent / "autoscaler/v2/monitor.py"
        logs = Path(os.path.realpath(self.tmp / "ray" / "session_latest")) / "logs"
        code = (
            "import runpy, sys\n"
            "import ray.autoscaler._private.providers as providers\n"
            f"providers._DEFAULT_CONFIGS['fake_multinode'] = lambda: {str(self.config)!r}\n"
            f"sys.argv = [{str(monitor)!r}, '--logs-dir={logs}', '--gcs-address={self.gcs}',\n"
            f"            '--autoscaling-config={self.config}', '--monitor-ip={self.ip}']\n"
            f"runpy.run_path({str(monitor)!r}, run_name='__main__')\n"
        )
        mon = subprocess.Popen(
            [sys.executable, "-u", "-c", code],
            env=self.env,
            start_new_session=True,
            stdout=open(self.tmp / "v2-monitor.out", "w"),
            stderr=subprocess.STDOUT,
        )
        self.groups.append(mon.pid)

    def _wait_ready(self) -> None:
        deadline = time.time() + 120
        while True:
            proc = self.ray("status", f"--address={self.gcs}", timeout=60)
            if proc.returncode == 0 and "Node status" in proc.stdout:
                return
            assert time.time() < deadline, proc.stdout[-2000:] + proc.stderr[-2000:]
            time.sleep(2)

    def stop(self) -> list[int]:
        """Stops every process we started; returns the pids that needed SIGKILL."""
        self.survived_sigterm: list[str] = []
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            for pgid in self.groups:
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
            for pid in marked_pids(self.token):  # fake nodes and workers, whatever their group
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while marked_pids(self.token) and time.time() < deadline:
                time.sleep(0.5)
            if not marked_pids(self.token):
                break
            if sig == signal.SIGTERM:  # for the log: what outlives SIGTERM by `wait` seconds
                self.survived_sigterm = sorted({comm(p) for p in marked_pids(self.token)})
        if getattr(self, "head", None) is not None and self.head.poll() is None:
            self.head.wait(timeout=10)
        left = marked_pids(self.token)
        if not left:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return left


def first(rows: list[dict], cond, after: float = 0.0) -> float | None:
    return next((r["t"] for r in rows if r["t"] >= after and cond(r)), None)


@pytest.mark.parametrize(
    "version,job", [("v1", PG_JOB), ("v2", PG_JOB), ("v2", TRAIN_JOB)], ids=["v1-pg", "v2-pg", "v2-train"]
)
def test_job_scales_workers_up_and_idle_workers_down(version, job):
    started = time.time()
    cluster = FakeAutoscalingCluster(version)
    observer = None
    try:
        cluster.start()
        head_up = time.time()
        sid = f"raylm-autoscale-{secrets.token_hex(4)}"
        observer = subprocess.Popen(
            [sys.executable, "-c", OBSERVER, cluster.gcs, cluster.dashboard, sid],
            env=cluster.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
        )
        rows: list[dict] = []
        threading.Thread(
            target=lambda: [rows.append(json.loads(line)) for line in observer.stdout], daemon=True
        ).start()
        deadline = time.time() + 60
        while not rows:
            assert time.time() < deadline and observer.poll() is None, "observer did not start"
            time.sleep(0.2)
        assert rows[-1]["workers"] == [], f"worker nodes before any job: {rows[-1]}"

        t0 = time.time()
        sub = cluster.ray(
            "job",
            "submit",
            f"--address={cluster.dashboard}",
            f"--submission-id={sid}",
            "--no-wait",
            "--",
            "python",
            "-c",
            job,
        )
        assert sub.returncode == 0, sub.stdout[-2000:] + sub.stderr[-2000:]

        def wait_for(cond, timeout: float, what: str) -> float:
            end = time.time() + timeout
            while time.time() < end:
                t = first(list(rows), cond, t0)
                if t is not None:
                    return t
                assert observer.poll() is None, "observer died"
                time.sleep(0.5)
            pytest.fail(f"timed out waiting for {what}; last observation: {rows[-1] if rows else None}")

        t_first = wait_for(lambda r: len(r["workers"]) >= 1, UP_TIMEOUT_S, "a first worker node")
        t_two = wait_for(lambda r: len(r["workers"]) >= 2, UP_TIMEOUT_S, "2 worker nodes")
        t_done = wait_for(lambda r: r["job"] in ("SUCCEEDED", "FAILED", "STOPPED"), JOB_TIMEOUT_S, "job end")
        t_gone = wait_for(
            lambda r: r["t"] >= t_done and r["workers"] == [], DOWN_TIMEOUT_S, "idle workers to be removed"
        )
        snapshot = list(rows)

        status = next(r["job"] for r in snapshot if r["t"] >= t_done)
        logs = cluster.ray("job", "logs", f"--address={cluster.dashboard}", sid).stdout
        assert status == "SUCCEEDED", logs[-3000:]
        (nodes_line,) = [x for x in logs.splitlines() if x.startswith("NODES ")]
        job_nodes = json.loads(nodes_line.removeprefix("NODES "))
        seen = {w for r in snapshot for w in r["workers"]}
        max_workers = max(len(r["workers"]) for r in snapshot)
        # Two 1-CPU workers on two distinct autoscaled worker nodes (the head has 0 CPUs).
        assert len(set(job_nodes)) == 2 and set(job_nodes) <= seen, (job_nodes, seen)
        assert max_workers == 2  # max_workers in the config caps it

        timeline = {
            "autoscaler": version,
            "job": "train" if job is TRAIN_JOB else "placement-group",
            "head_start_s": round(head_up - started, 1),
            "first_worker_up_s": round(t_first - t0, 1),
            "two_workers_up_s": round(t_two - t0, 1),
            "job_done_s": round(t_done - t0, 1),
            "workers_gone_s": round(t_gone - t0, 1),
            "gone_after_job_done_s": round(t_gone - t_done, 1),
        }
        print("\nAUTOSCALING TIMELINE (seconds from `ray job submit`):", json.dumps(timeline))
    finally:
        if observer is not None:
            observer.kill()
            observer.wait()
        stopping = time.time()
        left = cluster.stop()
        print(
            f"cleanup: {time.time() - stopping:.1f} s; still up 5 s after SIGTERM, then killed: "
            f"{cluster.survived_sigterm or 'none'}"
        )
    assert not left, f"processes of this test still alive after SIGKILL: {left}"
    print(f"total (start, run, cleanup): {time.time() - started:.1f} s")
