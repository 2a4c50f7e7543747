"""What a namespace needs once, before any job: the run volume, the MLflow tracking server
and a NetworkPolicy. `raylm cluster render --platform` writes these; cluster/README.md."""

from __future__ import annotations

from raylm.cluster.manifests import MLFLOW_PORT, RAY_GID, RAY_UID, labels, metadata
from raylm.config import ClusterSection

MLFLOW_DB_SECRET = "mlflow-db"  # key `uri`: postgresql://USER:PASSWORD@HOST:5432/mlflow
DASHBOARD_PORT = 8265


def run_volume(cluster: ClusterSection) -> dict:
    s = cluster.storage
    spec = {
        "accessModes": ["ReadWriteMany"],  # every Ray pod, on any node, reads and writes it
        "resources": {"requests": {"storage": f"{s.size_gib}Gi"}},
    }
    if s.storage_class:
        spec["storageClassName"] = s.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata(s.claim, cluster), "spec": spec}


def namespace_only(cluster: ClusterSection) -> dict:
    """Ingress to every pod of the namespace only from pods of the same namespace, plus the
    KubeRay operator, which polls RayJob status on the head's dashboard port."""
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": cluster.operator_namespace}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata("raylm-namespace-only", cluster),
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {}}]},
                {"from": [operator], "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]},
            ],
        },
    }


def mlflow_server_args(cluster: ClusterSection) -> list[str]:
    hosts = [
        "mlflow",
        f"mlflow.{cluster.namespace}",
        f"mlflow.{cluster.namespace}.svc",
        f"mlflow.{cluster.namespace}.svc.cluster.local",
        "localhost",
        "127.0.0.1",
    ]
    return [
        "mlflow",
        "server",
        "--host",
        "0.0.0.0",  # the pod's own network; the Service and NetworkPolicy bound who reaches it
        "--port",
        str(MLFLOW_PORT),
        "--workers",
        "2",
        # The Host headers jobs and `kubectl port-forward` send; others are refused (DNS rebinding).
        "--allowed-hosts",
        ",".join(h + p for h in hosts for p in ("", f":{MLFLOW_PORT}")),
        "--serve-artifacts",
        "--artifacts-destination",
        cluster.mlflow_artifacts,
    ]


def mlflow_deployment(cluster: ClusterSection) -> dict:
    container = {
        "name": "mlflow",
        "image": cluster.image,  # the raylm image has mlflow, psycopg2 and boto3 (the `server` extra)
        "command": mlflow_server_args(cluster),
        "ports": [{"name": "http", "containerPort": MLFLOW_PORT}],
        "env": [
            {
                "name": "MLFLOW_BACKEND_STORE_URI",  # from a Secret: it holds the database password
                "valueFrom": {"secretKeyRef": {"name": MLFLOW_DB_SECRET, "key": "uri"}},
            }
        ],
        "envFrom": [{"secretRef": {"name": s, "optional": True}} for s in cluster.secrets],  # object-store keys
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
        "readinessProbe": {"httpGet": {"path": "/health", "port": MLFLOW_PORT}, "periodSeconds": 10},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    pod = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID},
        "containers": [container],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata("mlflow", cluster),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels("mlflow")},
            "template": {"metadata": {"labels": labels("mlflow")}, "spec": pod},
        },
    }


def mlflow_service(cluster: ClusterSection) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata("mlflow", cluster),
        "spec": {
            "type": "ClusterIP",
            "selector": labels("mlflow"),
            "ports": [{"name": "http", "port": MLFLOW_PORT, "targetPort": "http"}],
        },
    }


def platform(cluster: ClusterSection) -> list[dict]:
    return [run_volume(cluster), namespace_only(cluster), mlflow_deployment(cluster), mlflow_service(cluster)]
