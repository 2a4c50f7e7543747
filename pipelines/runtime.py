"""Where raylm meets a Ray cluster and an MLflow store: the embedded defaults live here.

Ray: the cluster named by --address or $RAY_ADDRESS, else a fresh local instance.
MLflow: tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db in the working dir.
"""

from __future__ import annotations

import logging
import os
import types
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from raylm.errors import ConfigError, IncompatibleVersion
from raylm.fmt import redact

# The versions raylm is tested with, as pyproject.toml pins them (tests/test_packaging.py checks):
# where raylm reaches past a library's public API, `require` names the version that had it.
TESTED = {"ray": "2.60", "mlflow": "3.17", "torch": "2.13"}


def require(owner, attribute: str, dist: str):
    """owner.attribute, which raylm uses although `dist` (ray, mlflow) does not publish it: the
    installed version lacking it fails at once, in one line naming the version that has it,
    rather than with an AttributeError deep in a worker or a silent change of behaviour."""
    try:
        return getattr(owner, attribute)
    except AttributeError:
        raise incompatible(f"{api_name(owner)}.{attribute}", dist) from None


def api_name(owner) -> str:
    """ray._private.ray_constants for a module, its module and class name for a class or an object."""
    if isinstance(owner, types.ModuleType) or (not isinstance(owner, type) and hasattr(owner, "__name__")):
        return owner.__name__
    cls = owner if isinstance(owner, type) else type(owner)
    return f"{cls.__module__}.{cls.__qualname__}"


def private_module(name: str, dist: str):
    """The module `name` of `dist`, which its next version may move or remove (see `require`)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
            raise  # a dependency of that module is missing, not the module itself
        raise incompatible(name, dist) from None


def incompatible(what: str, dist: str) -> IncompatibleVersion:
    from importlib.metadata import version

    tested = TESTED[dist]
    return IncompatibleVersion(
        f"raylm needs {what} ({dist} {tested} has it); {dist} {version(dist)} lacks it: install {dist}=={tested}.*"
    )


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
            logging.getLogger(TOKEN_AUTH_LOGGER).addFilter(not_token_auth_notice)
            logging.getLogger(NO_CPU_LOGGER).addFilter(not_no_cpu_warning)
            with loopback_node():
                ray.init(address="local", dashboard_host="127.0.0.1", logging_level=logging.WARNING)
            # One machine has no nodes to drain: Ray Train's preemption watcher (an actor polling
            # the GCS every 5 s) would only take CPU from the training workers.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    configure_ray_data()
    return ray.cluster_resources()


# A new local instance gets token authentication (Ray 2.60's default, and still wanted on a
# loopback-only node: any local process could otherwise run code in it), and Ray logs a WARNING
# saying so each time, with how to opt out. raylm keeps it on, so that notice is dropped; only
# that one: Ray's warning that authentication is *disabled* (RAY_AUTH_MODE=disabled) still shows.
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster."


def not_token_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(TOKEN_AUTH_NOTICE)


# Ray Data warns that "the Ray cluster currently does not have any available CPUs" when an
# execution starts while ray.available_resources() shows none. On a local instance raylm's
# stages run one after another, so what it sees there is the previous stage's tasks or actors
# not yet released (the warning showed once in the test suite, in a `raylm run` that was
# otherwise normal): the next execution waits for them; it does not hang. Dropped on the local
# instance only; on a shared cluster, a cluster full of other work is worth the warning.
NO_CPU_LOGGER = "ray.data.dataset"
NO_CPU_WARNING = "Warning: The Ray cluster currently does not have any available CPUs."


def not_no_cpu_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(NO_CPU_WARNING)


@contextmanager
def loopback_node():
    """Give the local instance the node IP 127.0.0.1, so that it listens on loopback only.

    Ray 2.60 binds its GCS, raylet, object manager, core workers and agents to every interface
    unless the node IP is loopback, and replaces a loopback node IP with the machine's address
    (services.resolve_ip_for_localhost) unless multi-node clusters are off, as they are by
    default on macOS and Windows (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). Ray parses that variable
    when it is imported, before this runs, so the parsed flag is set here, for this init only;
    once the node runs, Ray answers the node IP from the node. Nothing is left in the
    environment: a `ray start` launched later from this process keeps Ray's defaults."""
    ray_constants = private_module("ray._private.ray_constants", "ray")  # Ray has no public way to do this
    before = require(ray_constants, "ENABLE_RAY_CLUSTER", "ray")  # not a silent no-op if Ray renames it
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def configure_ray_data() -> None:
    """Progress bars redraw with carriage returns and flood `ray job logs`; raylm prints its
    own progress lines instead. Order is preserved so that the same inputs give the same shards.
    Sorts (prepare's dedup: judge.py) shuffle by tasks: Ray 2.60's default hash shuffle starts
    aggregator actors per operation, 6-10 s per sort or group-by on 2 cores against 0.2-1.3 s."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    # Ray Data's INFO lines ("execution finished ...") and the one-time progress-bar notice.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED


_cluster = None  # the config's cluster section (size_pools_for), for a cluster that reports no CPU yet


def size_pools_for(cluster) -> None:
    """Remember the config's cluster section: cluster_cpus falls back on its CPU worker group."""
    global _cluster
    _cluster = cluster


def cluster_cpus() -> float:
    import ray

    return pool_cpus(ray.cluster_resources(), _cluster)


# `raylm cluster render` sets this in every Ray pod it lays out: there the config's cluster
# section describes the worker groups the autoscaler may bring up. Anywhere else (a static
# cluster, `ray start` on some machines) it describes nothing that exists.
RENDERED_CLUSTER = "RAYLM_RENDERED_CLUSTER"


def on_rendered_cluster() -> bool:
    return _cluster is not None and os.environ.get(RENDERED_CLUSTER) == "1"


def reachable(resource: str) -> float:
    """The most CPUs or GPUs an actor pool can grow to: what the cluster has now, or on a
    cluster `raylm cluster render` laid out, what the config's worker group reaches at its
    max_nodes if that is more (Ray Data's pool asks the autoscaler for the rest)."""
    import ray

    now = float(ray.cluster_resources().get(resource, 0))
    if resource == "CPU":
        now = pool_cpus({"CPU": now}, _cluster)
    if not on_rendered_cluster():
        return now
    if resource == "CPU":
        return max(now, float(_cluster.cpu.max_nodes * _cluster.cpu.cpus))
    gpu = _cluster.gpu
    return max(now, float((gpu.max_nodes or 0) * gpu.gpus_per_node))


def node_cpus() -> float:
    """The CPUs of the largest node up, or of a CPU-group pod where the cluster is rendered:
    more threads than that, one actor cannot get."""
    import ray

    up = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=0.0)
    return max(up, float(_cluster.cpu.cpus)) if on_rendered_cluster() else up


def pool_cpus(resources: dict, cluster=None) -> float:
    """CPUs to size Ray Data's encoder and evaluation pools (and shared worker CPUs) from: the
    cluster's; when it reports none, as an autoscaling cluster does before its first worker pod
    (the head has num-cpus 0), the most the config's CPU worker group brings up; else an error
    (a pool of 1 would run a cluster's work on one CPU without a word)."""
    cpus = float(resources.get("CPU", 0))
    if cpus > 0:
        return cpus
    group = cluster.cpu.max_nodes * cluster.cpu.cpus if cluster is not None else 0
    if group > 0:
        print(
            f"[raylm] the Ray cluster reports no CPUs yet (an autoscaling cluster with no worker up): "
            f"sizing pools for cluster.cpu.max_nodes={cluster.cpu.max_nodes} x cluster.cpu.cpus={cluster.cpu.cpus}",
            flush=True,
        )
        return float(group)
    raise ConfigError(
        "the Ray cluster reports no CPUs (a head started with num-cpus 0 and no worker up?), so Ray Data's "
        "pools cannot be sized: add CPU workers, or for an autoscaling cluster set cluster.cpu.max_nodes "
        "and cluster.cpu.cpus to what its CPU worker group reaches"
    )


def tracking_uri(configured: str | None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    # An absolute path: Ray workers run in other working directories.
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_tracking_uri(configured: str | None) -> None:
    """Fail before Ray starts, naming the address, when no MLflow server answers at an http(s)
    tracking URI, or a sqlite store's folder is missing. (MLflow's own client would retry a
    refused connection 7 times with backoff, about 2 minutes, then fail after the workers ran.)"""
    uri = tracking_uri(configured)
    key = "tracking.tracking_uri" if configured else "$MLFLOW_TRACKING_URI"
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        reason = unreachable(uri)
        if reason:
            raise ConfigError(
                f"{key}: no MLflow server answers at {redact(uri)} ({reason}); start one, e.g. "
                "`mlflow server --host 127.0.0.1 --port 5000`, or fix the URI"
            )
    elif parsed.scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise ConfigError(f"{key}={uri}: the folder {folder} does not exist")


def unreachable(url: str, seconds: float = 5.0) -> str | None:
    """Why nothing answers HTTP at `url`, or None if anything does (any status: a proxy's 401
    still means the address is right)."""
    import requests

    try:
        requests.get(url, timeout=seconds)
    except requests.exceptions.Timeout:
        return f"no answer within {seconds:g} s"
    except requests.exceptions.ConnectionError as err:
        text = str(err)
        return (
            "connection refused"
            if "refused" in text
            else "name not resolved"
            if "resolve" in text
            else "cannot connect"
        )
    return None


@contextmanager
def env_defaults(defaults: dict[str, str]):
    """`defaults` in os.environ for the block, where the environment does not set them; the
    environment as it was afterwards."""
    saved = {key: os.environ.get(key) for key in defaults}
    os.environ.update({key: saved[key] or value for key, value in defaults.items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
