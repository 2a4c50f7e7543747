# raylm on a Ray GPU image. The tag must match the Ray pin in pyproject.toml and the
# rayVersion of every KubeRay manifest (tests/test_packaging.py checks all three agree).
# The base image ships Ray 2.60.0, Python 3.11 and CUDA, and runs as the non-root user `ray`.
FROM rayproject/ray:2.60.0-py311-gpu

USER ray
WORKDIR /home/ray/raylm
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

# Dependencies first, in their own layer: editing the source does not reinstall torch.
# pip resolves them from pyproject.toml alone, in a scratch folder holding an empty
# __init__.py for each package that pyproject.toml lists.
# On Linux x86_64, PyPI's torch is the CUDA build, which is what a GPU image wants; it is pinned
# to the version tested, inside pyproject.toml's range (tests/test_packaging.py checks).
# The `server` extra: the MLflow server's PostgreSQL and S3/GCS clients (cluster/platform.yaml
# runs MLflow from this same image).
COPY --chown=ray:users pyproject.toml README.md /tmp/deps/
RUN cd /tmp/deps \
 && python -c "import pathlib, tomllib; \
[(pathlib.Path(p.replace('.', '/')).mkdir(parents=True, exist_ok=True), pathlib.Path(p.replace('.', '/'), '__init__.py').touch()) \
 for p in tomllib.load(open('pyproject.toml', 'rb'))['tool']['setuptools']['packages']]" \
 && pip install '.[server]' 'torch==2.13.0' \
 && pip uninstall -y raylm \
 && cd / && rm -rf /tmp/deps

# The source itself, installed without touching the dependency layer. raylm/ holds symlinks
# to the top-level folders (raylm/models -> ../models, ...); the build copies the files.
COPY --chown=ray:users raylm/ raylm/
COPY --chown=ray:users models/ models/
COPY --chown=ray:users pipelines/ pipelines/
COPY --chown=ray:users tuning/ tuning/
COPY --chown=ray:users cluster/ cluster/
COPY --chown=ray:users configs/ configs/
RUN pip install --no-deps . && raylm --help > /dev/null

# The image has no .git: runs tag MLflow with the commit given at build time,
# `docker build --build-arg RAYLM_GIT_COMMIT=$(git rev-parse HEAD) .`
ARG RAYLM_GIT_COMMIT=""
ENV RAYLM_GIT_COMMIT=${RAYLM_GIT_COMMIT}

CMD ["raylm", "--help"]
