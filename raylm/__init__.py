"""raylm: train large language models end to end on a Ray cluster.

This package is the spine (config.py, errors.py, fmt.py: they import nothing else of raylm)
and the command line (cli/). The stages live in the repository's top-level folders, reached
through the symlinks beside this file: raylm/models -> ../models, raylm/pipelines ->
../pipelines, raylm/tuning -> ../tuning, raylm/cluster -> ../cluster.
"""

__version__ = "0.1.0"
