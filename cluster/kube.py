"""`raylm cluster apply|status|logs|delete`: the rendered objects, sent with the `kubernetes`
Python client (CustomObjectsApi for RayJob and RayCluster). Every failure a user can fix
becomes a ClusterError naming the cause: no kubeconfig, an unreachable API server, KubeRay
not installed, no permission, a job that already exists."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from raylm.errors import ClusterError

GROUP, VERSION = "ray.io", "v1"
CUSTOM = {"RayJob": "rayjobs", "RayCluster": "rayclusters"}  # kind -> plural
CORE = {  # kind -> (API class, method suffix)
    "ConfigMap": ("CoreV1Api", "config_map"),
    "PersistentVolumeClaim": ("CoreV1Api", "persistent_volume_claim"),
    "Service": ("CoreV1Api", "service"),
    "Deployment": ("AppsV1Api", "deployment"),
    "NetworkPolicy": ("NetworkingV1Api", "network_policy"),
}
KEEP_IF_EXISTS = {"PersistentVolumeClaim"}  # a claim's size and class are fixed once bound
INSTALL_KUBERAY = "helm install kuberay-operator kuberay/kuberay-operator (cluster/README.md)"


def api_client():
    """A client for the cluster in $KUBECONFIG / ~/.kube/config, or the pod's service account."""
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
            from kubernetes import client

            return client.ApiClient()
        # Named here: the client reads $KUBECONFIG once, at import.
        return config.new_client_from_config(config_file=kubeconfig_path())
    except (ConfigException, FileNotFoundError) as err:
        where = kubeconfig_path()
        raise ClusterError(
            f"no Kubernetes credentials ({where}): {err}. Point KUBECONFIG at your cluster's "
            "config, e.g. `gcloud container clusters get-credentials` or `aws eks update-kubeconfig`"
        ) from None


def kubeconfig_path() -> str:
    return os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


class ApiFailure(ClusterError):
    def __init__(self, message: str, status: int, missing: bool):
        super().__init__(message)
        self.status = status
        self.missing = missing  # the object itself does not exist (its kind and namespace do)


def call(fn, *args, what: str, **kwargs):
    """fn(*args) with the client's failures turned into errors that say what to do."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, **kwargs)
    except ApiException as err:
        missing = err.status == 404 and not_found(err) not in (None, "namespaces")
        raise ApiFailure(describe(err, what), err.status, missing) from None
    except HTTPError as err:  # connection refused, DNS, TLS: urllib3 retried and gave up
        host = fn.__self__.api_client.configuration.host
        raise ClusterError(f"{what}: cannot reach the Kubernetes API server at {host} ({type(err).__name__})") from None


def describe(err, what: str) -> str:
    missing = not_found(err)
    if err.status == 404 and missing == "namespaces":
        ns = what.split()[1].split("/")[0]
        return f"{what}: namespace {ns} does not exist; kubectl create namespace {ns}"
    if err.status == 404 and missing is None and what.split()[0] in CUSTOM:
        return f"{what}: the KubeRay CRDs (ray.io/v1) are not installed on this cluster; {INSTALL_KUBERAY}"
    if err.status == 404:
        return f"{what}: not found"
    if err.status == 403:
        return f"{what}: forbidden by the cluster's RBAC ({err.reason}); ask for create/get/patch/delete on it"
    if err.status == 409:
        return f"{what}: already exists"
    return f"{what}: the API server answered {err.status} {err.reason}: {(err.body or '').strip()[:300]}"


def not_found(err) -> str | None:
    """The kind of the missing object a 404 names ("rayjobs", "namespaces"), or None when the
    server does not know the resource type at all (a CRD that is not installed)."""
    try:
        details = json.loads(err.body or "").get("details") or {}
    except (ValueError, AttributeError):
        return None
    return details.get("kind")


def apply(docs: list[dict]) -> list[str]:
    """Create every object, updating those that exist; a RayJob that exists is an error (its
    spec is fixed once submitted). Returns one line per object."""
    client = api_client()
    for doc in docs:
        if doc["kind"] == "RayJob" and exists(client, doc):
            name = doc["metadata"]["name"]
            raise ClusterError(
                f"RayJob {name} already exists; `raylm cluster delete` it first (the new job "
                "resumes from the run's checkpoints on the volume)"
            )
    return [apply_one(client, doc) for doc in docs]


def apply_one(client, doc: dict) -> str:
    kind, name, ns = doc["kind"], doc["metadata"]["name"], doc["metadata"]["namespace"]
    what = f"{kind} {ns}/{name}"
    try:
        call(create_fn(client, kind), *create_args(kind, ns, doc), what=what)
        return f"created {what}"
    except ApiFailure as err:
        if err.status != 409:
            raise
    if kind in KEEP_IF_EXISTS:
        return f"kept {what} (exists)"
    call(patch_fn(client, kind), *patch_args(kind, name, ns, doc), what=what)
    return f"updated {what}"


def create_fn(client, kind: str):
    if kind in CUSTOM:
        from kubernetes.client import CustomObjectsApi

        return CustomObjectsApi(client).create_namespaced_custom_object
    api, suffix = core_api(client, kind)
    return getattr(api, f"create_namespaced_{suffix}")


def create_args(kind: str, ns: str, doc: dict) -> tuple:
    return (GROUP, VERSION, ns, CUSTOM[kind], doc) if kind in CUSTOM else (ns, doc)


def patch_fn(client, kind: str):
    if kind in CUSTOM:
        from kubernetes.client import CustomObjectsApi

        return CustomObjectsApi(client).patch_namespaced_custom_object
    api, suffix = core_api(client, kind)
    return getattr(api, f"patch_namespaced_{suffix}")


def patch_args(kind: str, name: str, ns: str, doc: dict) -> tuple:
    return (GROUP, VERSION, ns, CUSTOM[kind], name, doc) if kind in CUSTOM else (name, ns, doc)


def core_api(client, kind: str):
    import kubernetes.client as k8s

    if kind not in CORE:
        raise ClusterError(f"raylm cluster apply does not handle kind {kind}; use kubectl apply")
    cls, suffix = CORE[kind]
    return getattr(k8s, cls)(client), suffix


def get(client, kind: str, name: str, ns: str) -> dict | None:
    """The object as the API server has it, or None when it does not exist."""
    if kind in CUSTOM:
        from kubernetes.client import CustomObjectsApi

        fn, args = CustomObjectsApi(client).get_namespaced_custom_object, (GROUP, VERSION, ns, CUSTOM[kind], name)
    else:
        api, suffix = core_api(client, kind)
        fn, args = getattr(api, f"read_namespaced_{suffix}"), (name, ns)
    try:
        return client.sanitize_for_serialization(call(fn, *args, what=f"{kind} {ns}/{name}"))
    except ApiFailure as err:
        if err.missing:
            return None
        raise


def exists(client, doc: dict) -> bool:
    return get(client, doc["kind"], doc["metadata"]["name"], doc["metadata"]["namespace"]) is not None


def status(kind: str, name: str, ns: str) -> list[str]:
    """A few lines on a RayJob or RayCluster and its pods."""
    client = api_client()
    obj = get(client, kind, name, ns)
    if obj is None:
        raise ClusterError(f"{kind} {ns}/{name} does not exist")
    st = obj.get("status", {})
    if kind == "RayJob":
        lines = [
            f"RayJob {ns}/{name}: job {st.get('jobStatus', '-')}, deployment {st.get('jobDeploymentStatus', '-')}, "
            f"cluster {st.get('rayClusterName', '-')}, "
            f"started {st.get('startTime', '-')}, ended {st.get('endTime', '-')}"
        ]
        if st.get("message"):
            lines.append(f"  message: {st['message']}")
        cluster = st.get("rayClusterName")
    else:
        lines = [f"RayCluster {ns}/{name}: {st.get('state', '-')}, {st.get('readyWorkerReplicas', 0)} ready workers"]
        cluster = name
    return lines + [f"  pod {p}" for p in pod_lines(client, ns, f"ray.io/cluster={cluster}")] if cluster else lines


def pod_lines(client, ns: str, selector: str) -> list[str]:
    from kubernetes.client import CoreV1Api

    pods = call(CoreV1Api(client).list_namespaced_pod, ns, label_selector=selector, what=f"pods {selector}")
    return [f"{p.metadata.name} {p.status.phase} on {p.spec.node_name or '(unscheduled)'}" for p in pods.items]


def logs(kind: str, name: str, ns: str, follow: bool) -> Iterator[str]:
    """The RayJob's submitter (it streams the job's driver output), or a RayCluster's head."""
    from kubernetes.client import CoreV1Api

    client = api_client()
    core = CoreV1Api(client)
    selector = f"job-name={name}" if kind == "RayJob" else f"ray.io/cluster={name},ray.io/node-type=head"
    pods = call(core.list_namespaced_pod, ns, label_selector=selector, what=f"pods of {kind} {ns}/{name}").items
    if not pods:
        raise ClusterError(f"no pod of {kind} {ns}/{name} yet ({selector}); try `raylm cluster status`")
    pod = sorted(pods, key=lambda p: p.metadata.creation_timestamp)[-1].metadata.name  # the latest retry
    stream = call(core.read_namespaced_pod_log, pod, ns, follow=follow, _preload_content=False, what=f"logs of {pod}")
    for chunk in stream.stream():
        yield chunk.decode(errors="replace")


def delete(kind: str, name: str, ns: str) -> list[str]:
    """The job or cluster (KubeRay removes its pods) and the job's ConfigMap; the run volume and
    MLflow stay."""
    from kubernetes.client import CoreV1Api, CustomObjectsApi

    client = api_client()
    done = []
    for what, fn, args in [
        (
            f"{kind} {ns}/{name}",
            CustomObjectsApi(client).delete_namespaced_custom_object,
            (GROUP, VERSION, ns, CUSTOM[kind], name),
        ),
        (f"ConfigMap {ns}/{name}-config", CoreV1Api(client).delete_namespaced_config_map, (f"{name}-config", ns)),
    ]:
        try:
            call(fn, *args, what=what)
            done.append(f"deleted {what}")
        except ApiFailure as err:
            if not err.missing:
                raise
            done.append(f"no {what}")
    return done
