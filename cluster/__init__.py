"""Deployment: the container image lives in ../Dockerfile; KubeRay manifests and job
submission come here (issue 8)."""
