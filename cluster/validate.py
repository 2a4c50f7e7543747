"""Checks a manifest passes before it goes near a cluster, all offline:

- schema: RayJob / RayCluster against the KubeRay CRD's openAPIV3Schema (jsonschema), with
  unknown keys as errors (the API server would silently prune them); core kinds against the
  Kubernetes OpenAPI schemas that `kubernetes-validate` ships, in strict mode;
- lint: the rules raylm holds its manifests to (GPU limits, pinned images, head num-cpus 0,
  TTL and deadline, token auth, no public Service, secrets only by reference).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import yaml

from raylm.cluster.manifests import RAY_VERSION
from raylm.config import walk

KUBERNETES_VERSION = "1.32.0"  # the API version core kinds are checked against (GKE/EKS stable in 2025)
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL)", re.I)


# --- schema ----------------------------------------------------------------------------------


@lru_cache
def crd_schema(crd_dir: str, kind: str) -> dict:
    # The C loader: the RayCluster CRD is 4,700 lines, 2.7 s with the pure-Python one.
    crd = yaml.load((Path(crd_dir) / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return closed(version["schema"]["openAPIV3Schema"])


def closed(schema: dict) -> dict:
    """The schema with additionalProperties false wherever it lists properties and does not
    say unknown fields are kept (x-kubernetes-preserve-unknown-fields): an unknown key is a typo."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes")}
    if "properties" in schema:
        out["properties"] = {k: closed(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = closed(schema[key])
    if "anyOf" in schema:
        out["anyOf"] = [closed(s) for s in schema["anyOf"]]
    return out


def schema_errors(doc: dict, crd_dir: str | Path) -> list[str]:
    kind = doc.get("kind")
    if kind in CRD_FILES:
        import jsonschema

        validator = jsonschema.Draft7Validator(crd_schema(str(crd_dir), kind))
        return [f"{kind} {_where(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    return core_errors(doc)


def core_errors(doc: dict) -> list[str]:
    try:
        import kubernetes_validate
    except ImportError:
        from raylm.errors import ConfigError

        raise ConfigError(
            "checking core Kubernetes kinds needs kubernetes-validate: pip install 'raylm[cluster]'"
        ) from None

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{doc.get('kind')} {_where(err.path)}: {err.message}"]
    return []


def _where(path) -> str:
    return ".".join(str(p) for p in path) or "(top)"


# --- lint ------------------------------------------------------------------------------------


def lint(doc: dict) -> list[str]:
    """Rule violations in one object, each naming where."""
    kind, problems = doc.get("kind"), []
    for where, container in containers(doc):
        problems += container_problems(f"{kind} {where}", container)
    spec = doc.get("spec", {})
    if kind == "RayJob":
        problems += ray_job_problems(spec)
        spec = spec.get("rayClusterSpec", {})
    if kind in ("RayJob", "RayCluster"):
        problems += ray_cluster_problems(kind, spec)
    if kind == "Service" and spec.get("type", "ClusterIP") != "ClusterIP":
        problems.append(f"Service {doc['metadata']['name']}: type {spec['type']} exposes it outside the cluster")
    return problems


def containers(doc: dict):
    """(path, container) for every container in the object, however deep its pod templates."""
    for path, node in walk(doc):
        if path.rpartition(".")[2] in ("containers", "initContainers") and isinstance(node, list):
            yield from ((f"{path}.{i}", container) for i, container in enumerate(node))


def container_problems(where: str, c: dict) -> list[str]:
    problems = []
    image = c.get("image", "")
    if "@sha256:" not in image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
        problems.append(f"{where}: image {image!r} is not pinned to a tag or digest")
    res = c.get("resources", {})
    gpus = {k: res.get(k, {}).get("nvidia.com/gpu") for k in ("requests", "limits")}
    if gpus["requests"] != gpus["limits"]:
        problems.append(f"{where}: nvidia.com/gpu requests {gpus['requests']} != limits {gpus['limits']}")
    for env in c.get("env", []):
        if SECRET_NAME.search(env["name"]) and "value" in env:
            problems.append(f"{where}: env {env['name']} has a literal value; take it from a Secret (valueFrom)")
    return problems


def ray_job_problems(spec: dict) -> list[str]:
    problems = [
        f"RayJob spec.{key} is not set"
        for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit")
        if key not in spec
    ]
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("RayJob spec.shutdownAfterJobFinishes must be true: idle GPUs cost money")
    return problems


def ray_cluster_problems(kind: str, spec: dict) -> list[str]:
    problems, head = [], spec.get("headGroupSpec", {})
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append(f'{kind} head rayStartParams num-cpus must be "0": tasks on the head starve the driver')
    if spec.get("rayVersion") != RAY_VERSION:
        problems.append(f"{kind} rayVersion {spec.get('rayVersion')} != {RAY_VERSION} (the image's Ray)")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append(f"{kind} authOptions.mode must be token")
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append(f"{kind} head: the dashboard must not be exposed outside the cluster")
    for group in spec.get("workerGroupSpecs", []):
        problems += worker_group_problems(kind, group)
    return problems


def worker_group_problems(kind: str, group: dict) -> list[str]:
    where, pod = f"{kind} worker group {group.get('groupName')}", group["template"]["spec"]
    problems = []
    gpu = any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in pod["containers"])
    if gpu and group.get("minReplicas") != 0:
        problems.append(f"{where}: GPU groups scale from minReplicas 0")
    if gpu and not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])):
        problems.append(f"{where}: no toleration for the nvidia.com/gpu taint")
    if gpu and not pod.get("nodeSelector"):
        problems.append(f"{where}: no nodeSelector for the GPU node pool")
    return problems


def check(docs: list[dict], crd_dir: str | Path | None, core: bool = True) -> list[str]:
    """Every problem in a list of objects: lint, the KubeRay kinds' schema when the CRD files
    are at hand, the core kinds' schema when `core` (it needs kubernetes-validate)."""
    problems = []
    for doc in docs:
        if (crd_dir is not None and doc.get("kind") in CRD_FILES) or (core and doc.get("kind") not in CRD_FILES):
            problems += schema_errors(doc, crd_dir)
        problems += lint(doc)
    return problems
