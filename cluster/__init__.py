"""Deployment: the container image lives in ../Dockerfile; KubeRay manifests (render, validate,
kube) and Ray job submission (submit) live here."""
