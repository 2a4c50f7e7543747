"""How many trials of a sweep run at once. No Ray here: the driver counts them on the cluster it
joined, and `raylm cluster render` counts them on the worker groups it writes, because an
autoscaling cluster starts with 0 workers and its current size says nothing about its maximum.

Tune would start more trial processes than their Train workers can be placed for, and they
would wait on each other (ray#54305): the sweep's search algorithm holds back the rest.
"""

from __future__ import annotations

import math

from raylm.config import ScalingSection
from raylm.errors import ConfigError
from raylm.tuning.space import SweepSpec, distribution

TRIAL_CPU = 0.01  # the trial's own process only waits on its Train run (Tune refuses 0)


def largest_trial(spec: SweepSpec, scaling: ScalingSection, cpus_per_worker: float) -> tuple[int, float]:
    """(workers, CPUs per worker) of the largest trial the space can draw: the base config's,
    unless the space varies scaling.num_workers or scaling.cpus_per_worker (null: the base's)."""
    return (
        math.ceil(_largest(spec, "scaling.num_workers", scaling.num_workers)),
        _largest(spec, "scaling.cpus_per_worker", cpus_per_worker),
    )


def _largest(spec: SweepSpec, key: str, base: float) -> float:
    if key not in spec.space:
        return base
    kind, args = distribution(spec.space[key])
    values = [args] if kind == "fixed" else args  # a choice's or grid's values; a range's [low, high]
    return max(base if v is None else v for v in values)


def max_concurrent(spec: SweepSpec, scaling: ScalingSection, cpus_per_worker: float, resources: dict) -> int:
    """Trials at once on a running cluster of these resources (ray.cluster_resources()), or
    search.max_concurrent_trials when the sweep file sets it, whatever is up at this moment."""
    if spec.search.max_concurrent_trials:
        return spec.search.max_concurrent_trials
    workers, cpus = largest_trial(spec, scaling, cpus_per_worker)
    per_trial = TRIAL_CPU + workers * cpus
    fits = math.floor(resources.get("CPU", 0) / per_trial + 1e-9)
    if scaling.use_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0) / workers))
    if fits < 1:
        needs = f"{per_trial:g} CPUs" + (f" and {workers} GPUs" if scaling.use_gpu else "")
        raise ConfigError(
            f"search.max_concurrent_trials: one trial needs {needs}; the cluster has {resources.get('CPU', 0):g} "
            f"CPUs and {resources.get('GPU', 0):g} GPUs up now: set search.max_concurrent_trials in the sweep "
            "file for a cluster that adds nodes on demand"
        )
    return fits


def trials_on_nodes(nodes: list[tuple[float, int]], workers: int, cpus: float, gpu: bool) -> int:
    """Whole trials placed one after another on nodes of (CPUs, GPUs), first fit: the trial's
    own process first, then its `workers` workers of `cpus` CPUs (and one GPU each). A worker is
    placed on one node, so 2 workers of 6 CPUs fit a 16-CPU node and a third does not."""
    free = [list(node) for node in nodes]
    trials = 0
    while _place(free, TRIAL_CPU, 0) and all(_place(free, cpus, int(gpu)) for _ in range(workers)):
        trials += 1
    return trials


def _place(free: list[list[float]], cpus: float, gpus: int) -> bool:
    for node in free:
        if node[0] + 1e-9 >= cpus and node[1] >= gpus:
            node[0] -= cpus
            node[1] -= gpus
            return True
    return False
