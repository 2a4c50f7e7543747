"""Packaging facts that must agree across files: Ray pin, Docker image tag, CI and README."""

import re
import tomllib

from .conftest import REPO


def ray_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray[")]
    return re.fullmatch(r"ray\[[a-z,]+\]==(\d+\.\d+)\.\*", ray).group(1)


def test_docker_image_tag_matches_ray_pin():
    (base,) = re.findall(r"^FROM\s+(\S+)", (REPO / "Dockerfile").read_text(), flags=re.M)
    image, tag = base.split(":")
    assert image == "rayproject/ray"
    version, python, variant = re.fullmatch(r"(\d+\.\d+\.\d+)-(py\d+)-(gpu|cu\d+)", tag).groups()
    assert version.rsplit(".", 1)[0] == ray_pin()


def test_installed_ray_matches_pin():
    import ray

    assert ray.__version__.startswith(ray_pin() + ".")


def test_dockerfile_copies_every_package_folder():
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    text = (REPO / "Dockerfile").read_text()
    for folder in packages:
        assert f"COPY --chown=ray:users {folder}/ {folder}/" in text


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    (test_cmd,) = [c for c in commands if "pytest" in c and "venv" in c]
    assert test_cmd.strip() in ci
