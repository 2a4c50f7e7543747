"""raylm: train large language models end to end on a Ray cluster.

The code lives in the repository's top-level folders, installed under this namespace:
models/ -> raylm.models, pipelines/ -> raylm.pipelines, tuning/ -> raylm.tuning,
cluster/ -> raylm.cluster.
"""

__version__ = "0.1.0"

# A Ray job submitted with the repository as its working dir (`ray job submit --working-dir .`,
# `raylm submit`) has that folder first on PYTHONPATH, so this file is imported from the copy
# even where raylm is installed (the Docker image), and the subpackages sit beside it
# (../pipelines), not under it: look for them there too. Installed, raylm/pipelines/ exists.
from pathlib import Path as _Path

_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pipelines" / "errors.py").is_file() and not (_checkout / "raylm" / "pipelines").is_dir():
    __path__.append(str(_checkout))
del _Path, _checkout
