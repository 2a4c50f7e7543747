"""What each field of a rendered manifest is for, written above its first use in each object,
so `raylm cluster render` output reads like the KubeRay samples (and the committed examples
in cluster/ are exactly that output)."""

from __future__ import annotations

import re

import yaml

COMMENTS = {
    # RayJob
    "entrypoint": "Runs on the head as the job's driver; its config is the ConfigMap mounted at /home/ray/job.",
    "runtimeEnvYAML": "`ray job stop` waits this long for the checkpoint raylm writes on SIGTERM before SIGKILL (Ray's default: 3 s).",
    "shutdownAfterJobFinishes": "Delete the Ray cluster when the job ends: idle GPUs still bill.",
    "ttlSecondsAfterFinished": "...after this many seconds, so `raylm cluster logs` still works for a while.",
    "activeDeadlineSeconds": "Fail the job (and free its nodes) if it runs longer than this.",
    "backoffLimit": "Retries after a failure, each on a fresh cluster; same run name + volume = it resumes from the last checkpoint.",
    "rayVersion": "Must equal the Ray in the image (Dockerfile FROM rayproject/ray:2.60.0-...).",
    "enableInTreeAutoscaling": "The Ray autoscaler (a sidecar on the head) adds worker pods for pending tasks and removes idle ones.",
    "autoscalerOptions": "Autoscaler v2; idleTimeoutSeconds: how long a worker pod may sit idle before it goes.",
    "authOptions": "Ray token authentication: KubeRay makes a token Secret; every Ray client call must present it.",
    "serviceType": "ClusterIP: the dashboard and job API are reachable only inside the cluster (use kubectl port-forward).",
    "rayStartParams": 'num-cpus "0" keeps tasks off the head, so the driver and the autoscaler never starve.',
    "securityContext": "The image's non-root user `ray` (uid 1000); no privilege escalation, no Linux capabilities.",
    "resources": "Requests equal limits (Guaranteed QoS); Ray reads its CPU/GPU/memory counts from the limits.",
    "env": "MLFLOW_TRACKING_URI: every stage logs to the in-cluster MLflow server.",
    "envFrom": "Credentials (S3/GCS/HF keys) only from Secrets, never written into a manifest.",
    "volumeMounts": "The run volume holds prepared data and checkpoints (pod disk dies with the pod); /dev/shm for the object store.",
    "volumes": "runs: a ReadWriteMany claim (NFS/Filestore/EFS or a bucket via its CSI driver); dshm: memory-backed /dev/shm.",
    "workerGroupSpecs": "CPU workers for Ray Data; GPU workers for Ray Train. Both start at 0 and scale with demand.",
    "minReplicas": "0: no idle node is paid for between jobs.",
    "maxReplicas": "The most pods the autoscaler may start for this group.",
    "restartPolicy": "Never: autoscaler v2 replaces a failed pod itself; Ray Train restarts the workers from a checkpoint.",
    "lifecycle": "Before an eviction's SIGTERM reaches `ray start`, SIGTERM the raylm driver and wait: it checkpoints and stops.",
    "terminationGracePeriodSeconds": "cluster.stop_grace_seconds: how long the preStop hook and the driver's checkpoint may take.",
    "nodeSelector": "The GPU node pool (and, with cluster.gpu.spot, its spot nodes).",
    "tolerations": "GPU (and spot) nodes are tainted so that only pods asking for them land there.",
    # ConfigMap
    "data": "The raylm config the job runs: yours, with run.output_dir on the run volume.",
    # platform
    "accessModes": "ReadWriteMany: every Ray pod, on any node, reads and writes the same files.",
    "policyTypes": "Ingress only from this namespace's pods, plus the KubeRay operator on the dashboard port (8265).",
    "command": "MLflow with runs in PostgreSQL (MLFLOW_BACKEND_STORE_URI from the mlflow-db Secret) and artifacts in the bucket.",
    "readinessProbe": "The Service sends traffic only once the server answers /health.",
    "type": "ClusterIP: MLflow is reachable inside the cluster; reviewers use kubectl port-forward svc/mlflow 5000.",
}
# Keys whose own note covers the keys under them, which would otherwise take a note meant for
# another object (the preStop hook's exec `command` is not MLflow's).
COVERS = {"lifecycle": ("command",)}
KEY = re.compile(r"^(\s*)(- )?([A-Za-z][\w.-]*):")
BLOCK = re.compile(r"^(\s*)(- )?[\w.-]+: [|>][-+]?$")  # a key whose value is a multi-line block


class Dumper(yaml.SafeDumper):
    """Multi-line strings (the job's config.yaml) as literal blocks, readable in the manifest."""


Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def dump_commented(docs: list[dict]) -> str:
    return "---\n".join(commented(yaml.dump(d, Dumper=Dumper, sort_keys=False, width=120)) for d in docs)


def commented(text: str) -> str:
    """The YAML text with each COMMENTS key's note above its first occurrence, outside blocks."""
    seen, out, block_indent = set(), [], None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if block_indent is not None and (indent > block_indent or not line.strip()):
            out.append(line)  # inside a literal block: content, not YAML keys
            continue
        block_indent = None
        m = KEY.match(line)
        if m and m.group(3) in COMMENTS and m.group(3) not in seen:
            seen.update((m.group(3), *COVERS.get(m.group(3), ())))
            out.append(f"{m.group(1)}# {COMMENTS[m.group(3)]}")
        if BLOCK.match(line):
            block_indent = indent
        out.append(line)
    return "\n".join(out) + "\n"
