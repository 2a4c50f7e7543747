"""Packaging facts that must agree across files: Ray pin, Docker image tag, CI and README."""

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO


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


def dependency(name: str) -> Requirement:
    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    (req,) = [d for d in deps if d.name == name]
    return req


def test_ray_mlflow_and_torch_are_capped_at_the_versions_tested():
    """pyproject.toml admits the tested minor version of each and nothing newer (raylm uses APIs
    of Ray and MLflow that they do not publish: pipelines/runtime.py `require` names TESTED when
    one is gone), and those are the versions installed here."""
    from raylm.pipelines.runtime import TESTED

    for name, tested in TESTED.items():
        major, minor = map(int, tested.split("."))
        spec = dependency(name).specifier
        assert f"{tested}.0" in spec and f"{tested}.99" in spec and f"{major}.{minor + 1}.0" not in spec, name
        assert Version(version(name)).release[:2] == (major, minor), name


def test_dockerfile_pins_the_tested_torch():
    from raylm.pipelines.runtime import TESTED

    (pin,) = re.findall(r"'torch==([\d.]+)'", (REPO / "Dockerfile").read_text())
    assert pin.startswith(TESTED["torch"] + ".") and pin in dependency("torch").specifier


def listed_packages() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_packaged_subpackages_are_the_folders_that_exist():
    """pyproject.toml's list is every folder with an __init__.py under raylm/ (through its
    symlinks), so a new stage subpackage cannot be left out of the wheel or the image."""
    found = sorted(
        ".".join(Path(folder).relative_to(REPO).parts)
        for folder, _, files in os.walk(REPO / "raylm", followlinks=True)
        if "__init__.py" in files
    )
    assert sorted(listed_packages()) == found


def test_raylm_links_each_top_level_folder_and_the_dockerfile_copies_it():
    text = (REPO / "Dockerfile").read_text()
    links = [p for p in (REPO / "raylm").iterdir() if p.is_symlink()]
    assert sorted(p.name for p in links) == ["cluster", "models", "pipelines", "tuning"]
    for link in links:
        assert link.readlink() == Path("..") / link.name  # relative: survives a clone anywhere
        assert f"COPY --chown=ray:users {link.name}/ {link.name}/" in text
    assert "COPY --chown=ray:users raylm/ raylm/" in text
    # the dependency layer builds its stub packages from pyproject.toml's list, not its own copy
    assert "['tool']['setuptools']['packages']" in text


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    (test_cmd,) = [c for c in commands if "pytest" in c and "venv" in c]
    assert test_cmd.strip() in ci


def test_image_tag_equals_every_manifest_s_ray_version():
    from raylm.cluster.manifests import RAY_VERSION

    (base,) = re.findall(r"^FROM\s+(\S+)", (REPO / "Dockerfile").read_text(), flags=re.M)
    assert base.split(":")[1].split("-")[0] == RAY_VERSION
    assert RAY_VERSION.rsplit(".", 1)[0] == ray_pin()
    versions = re.findall(
        r"^\s*rayVersion: (\S+)", "".join(p.read_text() for p in (REPO / "cluster").glob("*.yaml")), flags=re.M
    )
    assert versions and set(versions) == {RAY_VERSION}


def test_dockerfile_runs_as_non_root_and_installs_dependencies_before_source():
    lines = (REPO / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and "root" not in users and users[-1] == "ray"
    first_run = next(i for i, line in enumerate(lines) if line.startswith("RUN "))
    assert next(i for i, line in enumerate(lines) if line.startswith("USER ")) < first_run
    deps = next(i for i, line in enumerate(lines) if "pip install '.[" in line)
    source = next(i for i, line in enumerate(lines) if line.startswith("COPY") and "raylm/" in line)
    assert deps < source  # a source edit must not reinstall torch


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "mlruns", "mlflow.db", ".env"} <= ignored


def test_every_module_resolves_by_a_plain_path_search_from_the_checkout():
    """What a static tool (Pyright, mypy, an IDE) does: look for raylm/x/y.py under the
    checkout, with no import hook. The editable install's finder is removed first, so only the
    folders and raylm/'s symlinks can make raylm.pipelines.data.prepare resolve."""
    modules = [
        ".".join(Path(folder, name).relative_to(REPO).with_suffix("").parts)
        for folder, _, files in os.walk(REPO / "raylm", followlinks=True)
        for name in files
        if name.endswith(".py") and name != "__init__.py"
    ]
    code = (
        "import importlib.util, json, sys; "
        "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in str(f)]; "
        f"sys.path.insert(0, {str(REPO)!r}); "
        "print(json.dumps([importlib.util.find_spec(m).origin for m in json.loads(sys.argv[1])]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(modules)], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr
    origins = [Path(p).resolve() for p in json.loads(proc.stdout)]
    assert len(modules) > 50 and all(p.is_relative_to(REPO) and p.is_file() for p in origins)
