"""raylm: train large language models end to end on a Ray cluster.

The code lives in the repository's top-level folders, installed under this namespace:
models/ -> raylm.models, pipelines/ -> raylm.pipelines, tuning/ -> raylm.tuning,
cluster/ -> raylm.cluster.
"""

__version__ = "0.1.0"
