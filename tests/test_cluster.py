"""KubeRay manifests (cluster/): rendered and committed ones validate against the real KubeRay
CRD schemas (../shared/k8s/crds) and Kubernetes' own, follow raylm's lint rules, and the
operating commands fail clearly up to the API call (there is no Kubernetes cluster here)."""

from __future__ import annotations

import copy
import json
import re
import shlex
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from raylm.cli import main
from raylm.cluster.manifests import RAY_VERSION
from raylm.cluster.render import pod_config, render_cluster, render_job, render_platform
from raylm.cluster.validate import check, lint, schema_errors
from raylm.config import ClusterSection, load_raw, validate
from raylm.errors import ConfigError
from tests.conftest import REPO, SHARED_DATA

CRDS = SHARED_DATA.parent / "k8s" / "crds"
EXAMPLES = sorted((REPO / "cluster").glob("*.yaml"))
GPT2 = REPO / "configs" / "gpt2-124m.yaml"


def docs_of(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render_command(path: Path) -> list[str]:
    (line,) = [line for line in path.read_text().splitlines() if line.startswith("#   raylm cluster render")]
    return shlex.split(line.removeprefix("#   raylm "))


def test_crds_are_at_hand():
    assert (CRDS / "ray.io_rayjobs.yaml").is_file() and (CRDS / "ray.io_rayclusters.yaml").is_file()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_committed_example_is_exactly_what_render_prints(path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out.yaml"
    assert main(render_command(path) + ["--out", str(out)]) == 0
    header = path.read_text().splitlines(keepends=True)[:4]
    assert all(line.startswith("#") for line in header)
    assert path.read_text() == "".join(header) + out.read_text()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_committed_example_validates(path):
    docs = docs_of(path)
    assert docs and check(docs, CRDS) == []


CONFIGS = ["quickstart.yaml", "gpt2-124m.yaml", "shakespeare.yaml", "sft.yaml"]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("how", ["job", "interactive"])
def test_rendered_from_shipped_configs_validate(name, how):
    """Any shipped config renders to valid objects once its inputs are where pods see them."""
    raw = load_raw(REPO / "configs" / name, ["scaling.cpus_per_worker=2"])
    for key in ("data", "finetune", "eval", "tokenizer"):  # inputs on this machine: not the point here
        raw.pop(key, None)
    docs = render_job(raw, "run") if how == "job" else render_cluster(raw)
    assert check(docs, CRDS) == []
    assert {d["kind"] for d in docs} == ({"ConfigMap", "RayJob"} if how == "job" else {"RayCluster"})


def test_platform_validates_and_keeps_secrets_out():
    docs = render_platform({})
    assert check(docs, CRDS) == []
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    env = deploy["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env == [
        {"name": "MLFLOW_BACKEND_STORE_URI", "valueFrom": {"secretKeyRef": {"name": "mlflow-db", "key": "uri"}}}
    ]
    assert "postgresql://" not in yaml.safe_dump_all(docs)


def test_job_layout_for_gpt2_on_8_gpus():
    cm, job = render_job(load_raw(GPT2), "pretrain")
    spec = job["spec"]
    assert spec["entrypoint"] == "raylm pretrain --config /home/ray/job/config.yaml"
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] == 2
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["authOptions"] == {"mode": "token"} and cluster["autoscalerOptions"]["version"] == "v2"
    cpu, gpu = cluster["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (gpu["minReplicas"], gpu["maxReplicas"], limits["nvidia.com/gpu"]) == (
        0,
        1,
        "8",
    )  # 8 workers, one 8-GPU node
    assert cpu["minReplicas"] == 0
    job_cfg = validate(yaml.safe_load(cm["data"]["config.yaml"]), "job")
    assert job_cfg.run.output_dir == "/mnt/raylm/runs" and job_cfg.run.name == "gpt2-124m"
    assert job_cfg.train.batch_size == 512  # the config is the user's, batch_tokens and all


def test_gpus_scoring_during_training_come_beside_the_training_gpus():
    """Training holds its 8 GPUs to the end: an evaluator replica of a GPU needs a second node
    of the GPU group; on CPU replicas (the default) the group stays one node; a job without a
    GPU group cannot give it one."""

    def gpu_pods(overrides: list[str]) -> int:
        raw = load_raw(GPT2, ["eval.task_data_dir=/mnt/raylm/tasks", *overrides])
        return render_job(raw, "run")[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["maxReplicas"]

    tasks = "eval.during_training.tasks=[configs/tasks/arc_easy.yaml]"
    assert gpu_pods([tasks]) == 1
    assert gpu_pods([tasks, "eval.during_training.resources.gpus_per_replica=1"]) == 2
    assert gpu_pods([tasks, "eval.during_training.resources.gpus_per_replica=1", "cluster.gpu.max_nodes=3"]) == 3
    with pytest.raises(ConfigError, match="eval.during_training.resources.gpus_per_replica: the job has no GPU"):
        gpu_pods([tasks, "eval.during_training.resources.gpus_per_replica=1", "scaling.use_gpu=false"])


def test_spot_gpus_add_the_spot_selector_and_toleration():
    raw = load_raw(GPT2, ["cluster.gpu.spot=true"])
    pod = render_job(raw, "pretrain")[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]
    assert pod["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
    assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["run.output_dir=/data/runs"], "run.output_dir=/data/runs is on the pod's own disk"),
        (["data.sources=[{paths: [corpus/a.txt]}]"], "data.sources.0.paths.0=corpus/a.txt is a path on this machine"),
        (
            ["tracking.tracking_uri=sqlite:///mlflow.db"],
            "tracking.tracking_uri=sqlite:///mlflow.db is a store on one machine",
        ),
        (["scaling.max_failures=0", "cluster.gpu.spot=true"], "scaling.max_failures=0 with cluster.gpu.spot"),
        (["scaling.cpus_per_worker=null"], "scaling.cpus_per_worker: set it for a cluster"),
        (["scaling.cpus_per_worker=9"], "scaling.cpus_per_worker=9 exceeds cluster.gpu.cpus_per_gpu=8"),
        (["cluster.imag=raylm"], "unknown key cluster.imag (did you mean cluster.image?)"),
        (
            ["tracking.tracking_uri=https://me:hunter2@mlflow.example.com"],
            "tracking.tracking_uri=https://me:***@mlflow.example.com carries a password",
        ),
        (  # a list item too: the whole list once went through as one value, unread
            ["data.sources=[{paths: ['https://me:hunter2@files.example.com/a.txt']}]"],
            "data.sources.0.paths.0=https://me:***@files.example.com/a.txt carries a password",
        ),
        (  # eval.texts are opened as local files: a URI is refused, its password masked in the message
            ["eval.texts=['https://me:hunter2@files.example.com/b.txt']"],
            "eval.texts.0: https://me:***@files.example.com/b.txt is a URI, but this key is read as a local path",
        ),
        (["tokenizer.path=s3://b/tokenizer.json"], "tokenizer.path: s3://b/tokenizer.json is a URI, but this key"),
        (["finetune.base=hf://org/model"], "finetune.base: hf://org/model is a URI, but this key is read as a local"),
        (["run.output_dir=s3://b/runs"], "run.output_dir: s3://b/runs is a URI: prepared data and samples need"),
    ],
)
def test_configs_a_cluster_cannot_run_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        render_job(load_raw(GPT2, overrides), "pretrain")


def test_a_local_input_the_pods_cannot_see_is_told_to_use_a_uri_only_where_one_is_read():
    with pytest.raises(ConfigError) as err:
        render_job(load_raw(GPT2, ["eval.task_data_dir=/data/tasks"]), "pretrain")
    assert str(err.value) == (
        "eval.task_data_dir=/data/tasks is a path on this machine, which the pods cannot see: copy it onto "
        "the run volume (cluster.storage.mount_path=/mnt/raylm)"
    )
    with pytest.raises(ConfigError, match=r"/mnt/raylm\) or use an s3:// gs:// hf:// URI$"):
        render_job(load_raw(GPT2, ["data.sources=[{paths: [/data/a.txt]}]"]), "pretrain")


def test_inputs_on_the_volume_or_in_buckets_are_fine():
    raw = load_raw(
        GPT2, ["data.sources=[{paths: [s3://b/corpus/, /mnt/raylm/extra.txt]}]", "run.output_dir=/mnt/raylm/x"]
    )
    out = pod_config(raw, ClusterSection())
    assert out["run"]["output_dir"] == "/mnt/raylm/x"
    bucket = pod_config(load_raw(GPT2, ["run.checkpoint_dir=s3://b/ckpt"]), ClusterSection())
    assert bucket["run"]["checkpoint_dir"] == "s3://b/ckpt"  # object storage stays where it is
    relative = pod_config(load_raw(GPT2, ["run.checkpoint_dir=ckpt"]), ClusterSection())
    assert relative["run"]["checkpoint_dir"] == "/mnt/raylm/ckpt"  # a path goes onto the run volume
    with pytest.raises(ConfigError, match=r"run\.checkpoint_dir=/data/ckpt is on the pod's own disk"):
        pod_config(load_raw(GPT2, ["run.checkpoint_dir=/data/ckpt"]), ClusterSection())


QUICKSTART = REPO / "configs" / "quickstart.yaml"
SWEEPS = sorted((REPO / "configs" / "tune").glob("*.yaml"))


def rendered_sweep(overrides: list[str], space: str) -> tuple[dict, dict]:
    """The sweep file the tune job's entrypoint reads (from its ConfigMap), and the RayJob."""
    cm, job = render_job(load_raw(QUICKSTART, overrides), "tune", space)
    assert job["spec"]["entrypoint"] == (
        "raylm tune --config /home/ray/job/config.yaml --space /home/ray/job/space.yaml --resume auto"
    )
    return yaml.safe_load(cm["data"]["space.yaml"]), job


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_tune_job_carries_the_space_file_with_its_concurrency(path):
    """The user's sweep, comments and all, plus search.max_concurrent_trials: the job's cluster
    starts with 0 workers up, where the driver counted 0 trials that fit and failed."""
    text = path.read_text()
    cm, _ = render_job(load_raw(QUICKSTART, ["scaling.cpus_per_worker=1"]), "tune", text)
    space = yaml.safe_load(text)
    trials = yaml.safe_load(cm["data"]["space.yaml"])["search"]["max_concurrent_trials"]
    assert yaml.safe_load(cm["data"]["space.yaml"]) == {
        **space,
        "search": {**space["search"], "max_concurrent_trials": trials},
    }
    assert [line for line in text.splitlines() if line.lstrip().startswith("#")] == [
        line for line in cm["data"]["space.yaml"].splitlines() if line.lstrip().startswith("#")
    ]
    # 4 CPU pods of 16 CPUs, trials of 2 workers of 1 CPU and the trial's own 0.01: 7 to a pod,
    # the 8th's second worker on the next pod; 31 in all (64 / 2.01 = 31.8)
    assert trials == 31
    with pytest.raises(ConfigError, match="--job tune needs --space"):
        render_job(load_raw(GPT2), "tune")


@pytest.mark.parametrize(
    "overrides, space, trials",
    [
        # 3 GPU pods of 2 GPUs (16 CPUs) at most, trials of 2 GPU workers: one trial a pod
        (
            ["scaling.use_gpu=true", "cluster.gpu.gpus_per_node=2", "cluster.gpu.max_nodes=3"],
            {},
            3,
        ),
        # a worker sits on one pod: 3 pods of 16 CPUs hold 3 workers of 10, not 48 / 10 = 4
        (["scaling.num_workers=1", "scaling.cpus_per_worker=10", "cluster.cpu.max_nodes=3"], {}, 3),
        # the space's largest trial counts: 2 workers of 10 CPUs on those 3 pods, once
        (
            ["scaling.num_workers=1", "scaling.cpus_per_worker=10", "cluster.cpu.max_nodes=3"],
            {"scaling.num_workers": {"choice": [1, 2]}},
            1,
        ),
    ],
)
def test_tune_job_runs_as_many_trials_as_the_worker_groups_hold(overrides, space, trials):
    text = yaml.safe_dump({"search": {"seed": 3}, "space": {"train.lr": {"choice": [1e-3, 3e-3]}, **space}})
    sweep, _ = rendered_sweep(["scaling.cpus_per_worker=8", *overrides], text)
    assert sweep["search"] == {"seed": 3, "max_concurrent_trials": trials}


def test_tune_job_keeps_the_sweep_file_s_own_concurrency():
    text = "search: {max_concurrent_trials: 2}  # two at once, whatever fits\nspace: {train.lr: 0.001}\n"
    cm, _ = render_job(load_raw(QUICKSTART, ["scaling.cpus_per_worker=1"]), "tune", text)
    assert cm["data"]["space.yaml"] == text


def test_tune_job_no_trial_of_which_fits_fails_at_render_naming_the_key():
    # one 16-CPU pod: a 16-CPU worker leaves no room for the trial's own 0.01 CPU
    raw = load_raw(QUICKSTART, ["scaling.num_workers=1", "scaling.cpus_per_worker=16", "cluster.cpu.max_nodes=1"])
    with pytest.raises(ConfigError, match=r"^search\.max_concurrent_trials: no trial fits .* cluster\.cpu\.max_nodes"):
        render_job(raw, "tune", "space: {train.lr: 0.001}\n")


def test_tune_job_refuses_a_bad_sweep_file_at_render():
    with pytest.raises(ConfigError, match="search.max_concurrent_trials"):
        render_job(
            load_raw(QUICKSTART, ["scaling.cpus_per_worker=1"]),
            "tune",
            "search: {max_concurrent_trials: 0}\nspace: {a: 1}\n",
        )


# --- the checks catch what they claim to ----------------------------------------------------


def gpt2_job() -> dict:
    return copy.deepcopy(render_job(load_raw(GPT2), "pretrain")[1])


def test_crd_schema_catches_unknown_keys_and_wrong_types():
    job = gpt2_job()
    job["spec"]["backofLimit"] = 2
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "4"
    errors = schema_errors(job, CRDS)
    assert any("'backofLimit' was unexpected" in e for e in errors)
    assert any("workerGroupSpecs.0.maxReplicas: '4' is not of type 'integer'" in e for e in errors)


def test_core_schema_catches_unknown_keys():
    (pvc, *_) = render_platform({})
    pvc["spec"]["acessModes"] = pvc["spec"].pop("accessModes")
    assert any("'acessModes' was unexpected" in e for e in schema_errors(pvc, CRDS))


@pytest.mark.parametrize(
    "breakage, problem",
    [
        (
            lambda s: s["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"].pop(
                "nvidia.com/gpu"
            ),
            "nvidia.com/gpu requests 8 != limits None",
        ),
        (
            lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].update(image="raylm:latest"),
            "is not pinned",
        ),
        (lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].update(image="raylm"), "is not pinned"),
        (lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": "4"}), 'num-cpus must be "0"'),
        (lambda s: s.update(rayVersion="2.9.0"), "rayVersion 2.9.0 != 2.60.0"),
        (lambda s: s.pop("authOptions"), "authOptions.mode must be token"),
        (lambda s: s["headGroupSpec"].update(serviceType="LoadBalancer"), "dashboard must not be exposed"),
        (lambda s: s["workerGroupSpecs"][1].update(minReplicas=1), "GPU groups scale from minReplicas 0"),
        (lambda s: s["workerGroupSpecs"][1]["template"]["spec"].pop("tolerations"), "no toleration"),
        (
            lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
                {"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}
            ),
            "has a literal value",
        ),
    ],
)
def test_lint_catches(breakage, problem):
    job = gpt2_job()
    assert lint(job) == []
    breakage(job["spec"]["rayClusterSpec"])
    assert any(problem in p for p in lint(job)), lint(job)


@pytest.mark.parametrize("key", ["ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"])
def test_lint_wants_job_lifecycle_limits(key):
    job = gpt2_job()
    del job["spec"][key]
    assert f"RayJob spec.{key} is not set" in lint(job)


def test_validate_command(tmp_path, capsys):
    assert main(["cluster", "validate", "--crds", str(CRDS), *map(str, EXAMPLES)]) == 0
    job = gpt2_job()
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = "1"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(job))
    assert main(["cluster", "validate", "--crds", str(CRDS), str(bad)]) == 1
    assert "num-cpus must be" in capsys.readouterr().out


def test_every_manifest_uses_the_image_s_ray():
    for path in EXAMPLES:
        for doc in docs_of(path):
            spec = doc.get("spec", {})
            version = spec.get("rayVersion") or spec.get("rayClusterSpec", {}).get("rayVersion")
            assert version in (None, RAY_VERSION), path
    assert ClusterSection().image.endswith(f"-ray{RAY_VERSION}")


# --- operating commands, up to the API call --------------------------------------------------


@pytest.fixture
def no_kubeconfig(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def test_status_without_kubeconfig_says_so(no_kubeconfig, capsys):
    assert main(["cluster", "status", str(GPT2)]) == 2
    err = capsys.readouterr().err
    assert "no Kubernetes credentials" in err and "KUBECONFIG" in err


def kubeconfig(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "test",
                "clusters": [{"name": "test", "cluster": {"server": server}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
                "users": [{"name": "test", "user": {"token": "not-a-real-token"}}],
            }
        )
    )
    return path


class KubeApiWithoutKubeRay(BaseHTTPRequestHandler):
    """An API server that has namespace raylm but no ray.io CRDs, answering as Kubernetes does:
    a plain-text 404 for an unknown API group, a Status object for a missing namespace."""

    def _answer(self):
        self.requests.append(f"{self.command} {self.path}")
        if self.path.startswith("/apis/ray.io/"):
            self._send(404, b"404 page not found\n", "text/plain")
        elif "/namespaces/nowhere/" in self.path:
            status = {
                "kind": "Status",
                "status": "Failure",
                "reason": "NotFound",
                "code": 404,
                "message": 'namespaces "nowhere" not found',
                "details": {"name": "nowhere", "kind": "namespaces"},
            }
            self._send(404, json.dumps(status).encode(), "application/json")
        else:
            self._send(500, b"{}", "application/json")

    def _send(self, code, payload, kind):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def api_server(tmp_path, monkeypatch):
    KubeApiWithoutKubeRay.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), KubeApiWithoutKubeRay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, f"http://127.0.0.1:{server.server_port}")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield KubeApiWithoutKubeRay.requests
    server.shutdown()


def test_apply_without_kuberay_names_the_missing_crds(api_server, capsys):
    assert main(["cluster", "apply", str(GPT2), "--job", "pretrain"]) == 2
    assert "the KubeRay CRDs (ray.io/v1) are not installed" in capsys.readouterr().err
    assert api_server == ["GET /apis/ray.io/v1/namespaces/raylm/rayjobs/gpt2-124m"]  # nothing created


def test_apply_into_a_missing_namespace_says_how_to_create_it(api_server, capsys):
    assert main(["cluster", "apply", "--platform", "--set", "cluster.namespace=nowhere"]) == 2
    assert "namespace nowhere does not exist; kubectl create namespace nowhere" in capsys.readouterr().err
    assert api_server[0].startswith("POST /api/v1/namespaces/nowhere/persistentvolumeclaims")


def test_unreachable_api_server_is_named(tmp_path, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, f"http://127.0.0.1:{port}")))
    assert main(["cluster", "delete", str(GPT2)]) == 2
    assert f"cannot reach the Kubernetes API server at http://127.0.0.1:{port}" in capsys.readouterr().err


def test_request_bodies_serialize_as_the_client_sends_them():
    from kubernetes.client import ApiClient

    for doc in render_job(load_raw(GPT2), "pretrain") + render_platform({}):
        assert ApiClient().sanitize_for_serialization(doc) == doc


# -- stopping: an eviction reaches the driver --------------------------------------------------


def head_pod(docs: list[dict]) -> tuple[dict, dict]:
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    return job, job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


def test_head_pod_stops_the_driver_before_the_pod_within_the_configured_grace():
    job, pod = head_pod(render_job(load_raw(GPT2, ["cluster.stop_grace_seconds=600"]), "pretrain"))
    (head,) = pod["containers"]
    assert head["lifecycle"]["preStop"]["exec"]["command"] == [
        "python",
        "-m",
        "raylm.cluster.prestop",
        "--timeout",
        "590",
    ]
    assert pod["terminationGracePeriodSeconds"] == 600
    assert 'RAY_JOB_STOP_WAIT_TIME_S: "600"' in job["spec"]["runtimeEnvYAML"]  # `ray job stop` waits as long
    with pytest.raises(ConfigError, match="cluster.stop_grace_seconds"):
        render_job(load_raw(GPT2, ["cluster.stop_grace_seconds=5"]), "pretrain")


@pytest.mark.parametrize(
    "argv, driver",
    [
        (["/home/ray/anaconda3/bin/python", "/home/ray/anaconda3/bin/raylm", "pretrain", "--config", "c.yaml"], True),
        (["python", "-m", "raylm", "run", "configs/quickstart.yaml"], True),
        (["raylm", "tune", "c.yaml", "--space", "s.yaml"], True),
        (["python", "-m", "raylm.cluster.prestop", "--timeout", "290"], False),  # the hook itself
        (["raylm", "runs"], False),  # reads MLflow, trains nothing
        (["ray", "start", "--head", "--block"], False),
        (["python", "-m", "pytest", "tests/raylm"], False),
    ],
)
def test_the_prestop_hook_signals_raylm_drivers_only(argv, driver):
    from raylm.cluster.prestop import is_driver

    assert is_driver(argv) is driver
