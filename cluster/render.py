"""`raylm cluster render`: a raylm config -> the Kubernetes objects that run it on KubeRay.

The job's config travels in a ConfigMap mounted on the head, where the RayJob's entrypoint
(`raylm <command> --config ...`) runs. It is the user's config with two changes, so that no
output is lost with a pod: run.output_dir moves onto the run volume, and tracking goes to the
cluster's MLflow server. Paths a pod cannot see fail here, naming the key.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import PurePosixPath

import yaml

from raylm.cluster.manifests import JOB_DIR, config_map, gpu_nodes, k8s_name, ray_cluster, ray_job, worker_nodes
from raylm.cluster.platform import platform
from raylm.config import ClusterSection, RaylmConfig, set_key, validate, walk
from raylm.errors import ConfigError
from raylm.fmt import redact
from raylm.tuning.capacity import largest_trial, trials_on_nodes
from raylm.tuning.space import SweepSpec, parse_sweep

JOB_COMMANDS = ("run", "prepare", "pretrain", "finetune", "evaluate", "tune")
URI_SCHEMES = ("s3://", "gs://", "hf://", "http://", "https://")

# Config keys holding input paths: a pod sees only its image, the run volume and URIs. The
# first two are read through pyarrow's filesystems; the rest are opened as local files, so the
# config refuses URIs for them (raylm/config.py LocalPath) and they belong on the run volume.
URI_KEYS = ("data.sources.*.paths.*", "finetune.sft.sources.*.paths.*")
PATH_KEYS = (
    *URI_KEYS,
    "finetune.base",
    "tokenizer.path",
    "eval.task_data_dir",
    "eval.texts.*",
    "data.decontaminate.eval_paths.*",
)


def render_job(raw: dict, command: str, space_text: str | None = None) -> list[dict]:
    """ConfigMap + RayJob running `raylm <command>` on a cluster of its own."""
    if command not in JOB_COMMANDS:
        raise ConfigError(f"--job {command}: expected one of {', '.join(JOB_COMMANDS)}")
    if (command == "tune") != (space_text is not None):
        raise ConfigError("--space goes with --job tune, and --job tune needs --space")
    cfg = validate(raw, "config")
    check_cluster_fit(cfg)
    job_cfg = pod_config(raw, cfg.cluster)
    name = k8s_name(cfg.cluster, cfg.run)
    files = {"config.yaml": yaml.safe_dump(job_cfg, sort_keys=False)}
    entrypoint = f"raylm {command} --config {JOB_DIR}/config.yaml"
    if space_text is not None:
        files["space.yaml"] = sweep_file(space_text, raw, cfg)
        entrypoint += f" --space {JOB_DIR}/space.yaml --resume auto"  # a retry continues the sweep
    return [config_map(name, cfg.cluster, files), ray_job(name, with_evaluator_gpus(cfg), cfg.scaling, entrypoint)]


def with_evaluator_gpus(cfg: RaylmConfig) -> ClusterSection:
    """The cluster section, its GPU group grown by the GPUs eval.during_training's replicas
    take beside the training workers' (where cluster.gpu.max_nodes leaves the size to raylm):
    training holds its GPUs to the end, so the evaluator's must be others."""
    side, gpu = cfg.eval.during_training, cfg.cluster.gpu
    eval_gpus = math.ceil((side.resources.replicas or 1) * (side.resources.gpus_per_replica or 0)) if side.tasks else 0
    if not eval_gpus or gpu.max_nodes is not None:
        return cfg.cluster
    per_pod, _ = gpu_nodes(cfg.cluster, cfg.scaling)  # the GPU pods' size, as the manifests lay them out
    nodes = math.ceil((cfg.scaling.num_workers + eval_gpus) / per_pod)
    return cfg.cluster.model_copy(update={"gpu": gpu.model_copy(update={"max_nodes": nodes})})


def sweep_file(space_text: str, raw: dict, cfg: RaylmConfig) -> str:
    """The sweep file the job runs: the user's, with search.max_concurrent_trials set to what the
    worker groups hold at their most pods where it is left out. The driver cannot count them: the
    cluster starts with 0 workers up, so counting there found 0 trials and the job failed."""
    spec = parse_sweep(space_text, "--space", raw)
    if spec.search.max_concurrent_trials:
        return space_text
    return with_max_concurrent(space_text, cluster_trials(cfg, spec))


def cluster_trials(cfg: RaylmConfig, spec: SweepSpec) -> int:
    """Trials of the sweep's largest shape the job's worker groups hold at once."""
    s = cfg.scaling
    workers, cpus = largest_trial(spec, s, s.cpus_per_worker)
    trials = trials_on_nodes(worker_nodes(cfg.cluster, s), workers, cpus, s.use_gpu)
    if trials < 1:
        group = "cluster.gpu.max_nodes" if s.use_gpu else "cluster.cpu.max_nodes"
        raise ConfigError(
            f"search.max_concurrent_trials: no trial fits the job's worker groups at their most pods, so none "
            f"would start: one needs {workers} workers of {cpus:g} CPUs{' and 1 GPU' if s.use_gpu else ''} "
            f"(scaling.num_workers, scaling.cpus_per_worker, or the space's largest values): raise {group} "
            "or make the trials smaller"
        )
    return trials


RENDERED = "# raylm cluster render: trials the job's worker groups hold at once"


def with_max_concurrent(text: str, trials: int) -> str:
    """The sweep file's text with search.max_concurrent_trials, its comments kept; when the edit
    does not read back as intended (an unusual layout), the file is written anew without them."""
    raw = yaml.safe_load(text) or {}
    want = {**raw, "search": {**(raw.get("search") or {}), "max_concurrent_trials": trials}}
    edited = _edited(text.splitlines(), want["search"])
    try:
        if yaml.safe_load(edited) == want:
            return edited
    except yaml.YAMLError:
        pass
    return yaml.safe_dump(want, sort_keys=False)


def _edited(lines: list[str], search: dict) -> str:
    """A line under a block `search:`; else the one-line `search: {...}` rewritten, or added."""
    at = next((i for i, line in enumerate(lines) if line.startswith("search:")), None)
    if at is not None and re.fullmatch(r"search:\s*(#.*)?", lines[at]):
        below = [line for line in lines[at + 1 :] if line.strip() and not line.lstrip().startswith("#")]
        indent = re.match(r"\s*", below[0]).group() if below else ""  # the block's own indentation
        entry = f"{indent or '  '}max_concurrent_trials: {search['max_concurrent_trials']}  {RENDERED}"
        return "\n".join([*lines[: at + 1], entry, *lines[at + 1 :]]) + "\n"
    flow = yaml.safe_dump({"search": search}, default_flow_style=None, sort_keys=False).strip() + "  " + RENDERED
    return "\n".join([*lines[:at], flow, *lines[at + 1 :]] if at is not None else [*lines, flow]) + "\n"


def render_cluster(raw: dict) -> list[dict]:
    """A long-lived RayCluster for interactive use; jobs go in with `raylm submit`."""
    cfg = validate(raw, "config")
    check_cluster_fit(cfg)
    return [ray_cluster(k8s_name(cfg.cluster, cfg.run), with_evaluator_gpus(cfg), cfg.scaling)]


def render_platform(raw: dict) -> list[dict]:
    return platform(validate(raw, "config").cluster)


def pod_config(raw: dict, cluster: ClusterSection) -> dict:
    """The config as the pods read it: outputs on the run volume, metrics to the cluster's MLflow."""
    out = copy.deepcopy(raw)
    set_key(out, "run.output_dir", on_volume(raw.get("run", {}).get("output_dir", "runs"), cluster, "run.output_dir"))
    checkpoints = raw.get("run", {}).get("checkpoint_dir")
    if checkpoints and not checkpoints.startswith(URI_SCHEMES):  # a bucket stays; a path goes on the volume
        set_key(out, "run.checkpoint_dir", on_volume(checkpoints, cluster, "run.checkpoint_dir"))
    uri = raw.get("tracking", {}).get("tracking_uri")
    if uri and not uri.startswith(("http://", "https://", "databricks")):
        raise ConfigError(
            f"tracking.tracking_uri={uri} is a store on one machine; on a cluster leave it "
            f"unset (jobs use cluster.mlflow_uri={cluster.mlflow_uri}) or give the server's URL"
        )
    for key, value in flatten_paths(out):
        check_visible(key, value, cluster)
    refuse_credentials(out)
    validate(out, "config for the cluster")
    return out


def refuse_credentials(raw: dict) -> None:
    """A user:password@ URI would be written into the ConfigMap in plain text. Every string is
    checked, list items too (data.sources.0.paths.1, eval.texts.0)."""
    for key, value in walk(raw):
        if isinstance(value, str) and redact(value) != value:
            raise ConfigError(
                f"{key}={redact(value)} carries a password, which would be written into the manifest: "
                "put it in a Secret named in cluster.secrets (e.g. MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD for the MLflow server) and leave it out of the URI"
            )


def on_volume(path: str, cluster: ClusterSection, key: str) -> str:
    """A relative output dir moves under the volume; an absolute one must already be there."""
    if not PurePosixPath(path).is_absolute():
        return str(PurePosixPath(cluster.storage.mount_path) / path)
    if not under_mount(path, cluster):
        raise ConfigError(
            f"{key}={path} is on the pod's own disk, lost with the pod: put it under "
            f"cluster.storage.mount_path={cluster.storage.mount_path}"
        )
    return path


def check_visible(key: str, path: str, cluster: ClusterSection) -> None:
    uri_ok = any(_matches(key, pattern) for pattern in URI_KEYS)
    if (uri_ok and path.startswith(URI_SCHEMES)) or under_mount(path, cluster):
        return
    raise ConfigError(
        f"{key}={path} is a path on this machine, which the pods cannot see: copy it onto the run "
        f"volume (cluster.storage.mount_path={cluster.storage.mount_path})"
        + (" or use an s3:// gs:// hf:// URI" if uri_ok else "")
    )


def under_mount(path: str, cluster: ClusterSection) -> bool:
    p, mount = PurePosixPath(path), PurePosixPath(cluster.storage.mount_path)
    return p == mount or mount in p.parents


def flatten_paths(raw: dict) -> list[tuple[str, str]]:
    """(dotted key with list indices, value) for every input path in the raw config."""
    return [
        (key, value)
        for key, value in walk(raw)
        if isinstance(value, str) and any(_matches(key, pattern) for pattern in PATH_KEYS)
    ]


def _matches(key: str, pattern: str) -> bool:
    parts, pats = key.split("."), pattern.split(".")
    return len(parts) == len(pats) and all(p == "*" and k.isdigit() or p == k for k, p in zip(parts, pats))


def check_cluster_fit(cfg: RaylmConfig) -> None:
    """Settings a laptop run tolerates but an autoscaling cluster cannot."""
    s, c = cfg.scaling, cfg.cluster
    side = cfg.eval.during_training
    if side.tasks and side.resources.gpus_per_replica and not s.use_gpu:
        raise ConfigError(
            "eval.during_training.resources.gpus_per_replica: the job has no GPU group (scaling.use_gpu "
            "is false); set it to 0 for CPU replicas"
        )
    if s.cpus_per_worker is None:
        raise ConfigError(
            "scaling.cpus_per_worker: set it for a cluster; an autoscaling cluster starts with no "
            "worker CPUs to share out (the head has num-cpus 0)"
        )
    if c.gpu.spot and s.use_gpu and s.max_failures == 0:
        raise ConfigError(
            "scaling.max_failures=0 with cluster.gpu.spot: a reclaimed spot node would fail the run; "
            "set it above 0 (or -1) so the workers restart from the last checkpoint"
        )
    pod_cpus = c.gpu.cpus_per_gpu if s.use_gpu else c.cpu.cpus
    if s.cpus_per_worker > pod_cpus:
        where = "cluster.gpu.cpus_per_gpu" if s.use_gpu else "cluster.cpu.cpus"
        raise ConfigError(
            f"scaling.cpus_per_worker={s.cpus_per_worker:g} exceeds {where}={pod_cpus}: no pod could hold a worker"
        )
    if not s.use_gpu and s.num_workers * s.cpus_per_worker > c.cpu.max_nodes * c.cpu.cpus:
        raise ConfigError(
            f"scaling.num_workers={s.num_workers} x cpus_per_worker={s.cpus_per_worker:g} exceed "
            f"cluster.cpu.max_nodes={c.cpu.max_nodes} x cluster.cpu.cpus={c.cpu.cpus}"
        )
