"""KubeRay manifests for a raylm config: plain dicts, ready for YAML or the Kubernetes API.

One layout for every job (cluster/README.md):
- a head pod that runs the driver and the autoscaler but no tasks (num-cpus "0"), so a busy
  driver never starves and the head can be small;
- a CPU worker group for Ray Data and a GPU worker group for Ray Train, both scaling from 0;
- every Ray pod mounts the run volume (prepared data, checkpoints) and a memory /dev/shm;
- credentials only from Secrets, the dashboard only inside the namespace, Ray token auth.

Nothing here talks to Kubernetes or imports training code: cluster/kube.py sends these.
"""

from __future__ import annotations

import math

from raylm.config import ClusterSection, RunSection, ScalingSection

API_VERSION = "ray.io/v1"
RAY_VERSION = "2.60.0"  # == the Dockerfile's base image tag and the pyproject pin (tests check)
JOB_DIR = "/home/ray/job"  # where the head pod mounts the job's config (a ConfigMap)
RAY_UID, RAY_GID = 1000, 100  # the rayproject/ray image's non-root user `ray` and group `users`
MLFLOW_PORT = 5000


def k8s_name(cluster: ClusterSection, run: RunSection) -> str:
    """The RayJob / RayCluster name: cluster.name, else run.name made DNS-1123 safe. KubeRay
    appends suffixes to it for pods and services, so it stays under 40 characters."""
    if cluster.name:
        return cluster.name
    name = "".join(c if c.isalnum() else "-" for c in run.name.lower()).strip("-")[:40].rstrip("-")
    return name if name[:1].isalpha() else f"raylm-{name}"[:40].rstrip("-")


def labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "raylm", "app.kubernetes.io/instance": name}


# --- pods ---------------------------------------------------------------------------------


def resources(cpus: int, memory_gib: int, gpus: int = 0) -> dict:
    """Requests equal to limits: the pod gets Guaranteed QoS, and Ray's view of the pod's CPUs
    and GPUs (read from the limits) matches what the scheduler reserved."""
    amounts = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def ray_env(cluster: ClusterSection) -> list[dict]:
    return [
        {"name": "MLFLOW_TRACKING_URI", "value": cluster.mlflow_uri},
        # raylm sizes evaluation pools from the cluster section's worker groups only where this says
        # the section describes the cluster (pipelines/runtime.py RENDERED_CLUSTER).
        {"name": "RAYLM_RENDERED_CLUSTER", "value": "1"},
        # Logs go to `kubectl logs` / `ray job logs` unbuffered, in order.
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def ray_container(name: str, cluster: ClusterSection, res: dict, extra_mounts: list[dict] = ()) -> dict:
    return {
        "name": name,
        "image": cluster.image,
        "imagePullPolicy": "IfNotPresent",
        "resources": res,
        "env": ray_env(cluster),
        # optional: a missing credentials Secret must not keep a job on local data from starting.
        "envFrom": [{"secretRef": {"name": s, "optional": True}} for s in cluster.secrets],
        "volumeMounts": [
            {"name": "runs", "mountPath": cluster.storage.mount_path},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *extra_mounts,
        ],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }


def pod_spec(container: dict, cluster: ClusterSection, extra_volumes: list[dict] = ()) -> dict:
    return {
        "securityContext": {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "fsGroup": RAY_GID},
        "containers": [container],
        "volumes": [
            {"name": "runs", "persistentVolumeClaim": {"claimName": cluster.storage.claim}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{cluster.shm_gib}Gi"}},
            *extra_volumes,
        ],
    }


def head_group(cluster: ClusterSection, config_map: str | None) -> dict:
    mounts = [{"name": "job", "mountPath": JOB_DIR, "readOnly": True}] if config_map else []
    volumes = [{"name": "job", "configMap": {"name": config_map}}] if config_map else []
    container = ray_container("ray-head", cluster, resources(cluster.head_cpus, cluster.head_memory_gib), mounts)
    # An eviction's SIGTERM goes to `ray start`, not the driver: the hook stops the driver
    # first (checkpoint at the end of the step), within the pod's grace period, 10 s kept for Ray.
    hook = ["python", "-m", "raylm.cluster.prestop", "--timeout", str(cluster.stop_grace_seconds - 10)]
    container["lifecycle"] = {"preStop": {"exec": {"command": hook}}}
    spec = pod_spec(container, cluster, volumes)
    spec["terminationGracePeriodSeconds"] = cluster.stop_grace_seconds
    return {
        "serviceType": "ClusterIP",  # reachable inside the cluster only; `kubectl port-forward` to use it
        # dashboard-host 0.0.0.0: the RayJob's submitter pod and the KubeRay operator reach the job
        # server from other pods (a pod's 127.0.0.1 is its own); the ClusterIP Service and the
        # NetworkPolicy keep it inside the namespace.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {"spec": spec},
    }


def gpu_nodes(cluster: ClusterSection, scaling: ScalingSection) -> tuple[int, int]:
    """(GPUs per pod, most pods): whole nodes, enough for one worker per GPU."""
    per_pod = min(cluster.gpu.gpus_per_node, scaling.num_workers)
    return per_pod, cluster.gpu.max_nodes or math.ceil(scaling.num_workers / per_pod)


def worker_nodes(cluster: ClusterSection, scaling: ScalingSection) -> list[tuple[int, int]]:
    """(CPUs, GPUs) of each worker pod the job's groups reach at their most pods (maxReplicas),
    CPU pods first: Ray keeps a task that needs no GPU off GPU nodes while others have room."""
    nodes = [(cluster.cpu.cpus, 0)] * cluster.cpu.max_nodes
    if scaling.use_gpu:
        gpus, pods = gpu_nodes(cluster, scaling)
        nodes += [(cluster.gpu.cpus_per_gpu * gpus, gpus)] * pods
    return nodes


def gpu_group(cluster: ClusterSection, scaling: ScalingSection) -> dict:
    g = cluster.gpu
    gpus, max_pods = gpu_nodes(cluster, scaling)
    container = ray_container(
        "ray-worker", cluster, resources(g.cpus_per_gpu * gpus, g.memory_gib_per_gpu * gpus, gpus)
    )
    spec = pod_spec(container, cluster)
    selector = {**g.node_selector, **(g.spot_node_selector if g.spot else {})}
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    tolerations += [
        {"key": k, "operator": "Equal", "value": v, "effect": "NoSchedule"}
        for k, v in (g.spot_node_selector.items() if g.spot else ())
    ]
    # Never: autoscaler v2 tracks each pod as one Ray node and replaces a failed one itself.
    spec.update(nodeSelector=selector, tolerations=tolerations, restartPolicy="Never")
    return {
        "groupName": "gpu",
        "replicas": 0,
        "minReplicas": 0,
        "maxReplicas": max_pods,
        "rayStartParams": {},
        "template": {"spec": spec},
    }


def cpu_group(cluster: ClusterSection) -> dict:
    c = cluster.cpu
    spec = pod_spec(ray_container("ray-worker", cluster, resources(c.cpus, c.memory_gib)), cluster)
    spec["restartPolicy"] = "Never"  # as for the GPU group
    return {
        "groupName": "cpu",
        "replicas": 0,
        "minReplicas": 0,
        "maxReplicas": c.max_nodes,
        "rayStartParams": {},
        "template": {"spec": spec},
    }


def ray_cluster_spec(cluster: ClusterSection, scaling: ScalingSection, config_map: str | None) -> dict:
    groups = [cpu_group(cluster)] + ([gpu_group(cluster, scaling)] if scaling.use_gpu else [])
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",
            "upscalingMode": "Default",
            "idleTimeoutSeconds": cluster.idle_timeout_seconds,
        },
        "authOptions": {"mode": "token"},
        "headGroupSpec": head_group(cluster, config_map),
        "workerGroupSpecs": groups,
    }


# --- objects -------------------------------------------------------------------------------


def metadata(name: str, cluster: ClusterSection) -> dict:
    return {"name": name, "namespace": cluster.namespace, "labels": labels(name)}


def config_map(name: str, cluster: ClusterSection, files: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(f"{name}-config", cluster), "data": files}


# `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s by default).
# raylm answers SIGTERM by finishing the step, checkpointing and ending its MLflow run KILLED:
# seconds on a small model, a few minutes for a 7B model's 84 GB of weights and optimizer
# state on a network volume. A job's runtime env reaches its supervisor, which reads it.
# `raylm submit` uses this; a rendered RayJob uses cluster.stop_grace_seconds (same default).
JOB_STOP_GRACE_S = 300


def ray_job(name: str, cluster: ClusterSection, scaling: ScalingSection, entrypoint: str) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": metadata(name, cluster),
        "spec": {
            "entrypoint": entrypoint,
            "runtimeEnvYAML": f'env_vars:\n  RAY_JOB_STOP_WAIT_TIME_S: "{cluster.stop_grace_seconds}"\n',
            "shutdownAfterJobFinishes": True,  # the GPUs go back when the job ends
            "ttlSecondsAfterFinished": cluster.ttl_seconds_after_finished,
            "activeDeadlineSeconds": cluster.active_deadline_seconds,
            "backoffLimit": cluster.backoff_limit,
            "rayClusterSpec": ray_cluster_spec(cluster, scaling, f"{name}-config"),
        },
    }


def ray_cluster(name: str, cluster: ClusterSection, scaling: ScalingSection) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": metadata(name, cluster),
        "spec": ray_cluster_spec(cluster, scaling, None),
    }


def dump(docs: list[dict]) -> str:
    from raylm.cluster.comments import dump_commented

    return dump_commented(docs)
