"""Where raylm meets a Ray cluster and an MLflow store: the embedded defaults live here.

Ray: the cluster named by --address or $RAY_ADDRESS, else a fresh local instance.
MLflow: tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db in the working dir.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path


def start_ray(address: str | None = None) -> dict:
    """Connect to (or start) Ray once per process; returns the cluster's resources."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # "local" forces a new instance: a bare init() may join a stale `ray start` cluster.
            # The dashboard stays on: Ray Train's cleanup polls the state API it serves.
            ray.init(address="local", dashboard_host="127.0.0.1", logging_level=logging.WARNING)
            # One machine has no nodes to drain: Ray Train's preemption watcher (an actor polling
            # the GCS every 5 s) would only take CPU from the training workers.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    quiet_ray_data()
    return ray.cluster_resources()


def quiet_ray_data() -> None:
    """Progress bars redraw with carriage returns and flood `ray job logs`; raylm prints its
    own progress lines instead. Order is preserved so that the same inputs give the same shards."""
    import ray.data

    # Ray Data's INFO lines ("execution finished ...") and the one-time progress-bar notice.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def tracking_uri(configured: str | None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    # An absolute path: Ray workers run in other working directories.
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
