"""Downstream scores while training runs (eval.during_training): a follow-evaluator, a Ray
actor on the driver's node, lists the run's checkpoint folder every POLL_SECONDS and scores
each new whole checkpoint on the listed tasks, on scoring replicas of its own, logging
task/<name>/<metric> at the checkpoint's step to the training run. The training workers never
hear of it, so no step waits for scoring; when training ends, the driver tells it the last
step, and the run ends once that checkpoint is scored.

llm-foundry and OLMo compute such scores inside the training loop, stopping training for them;
here they cost training only the CPUs or GPUs the evaluator's replicas take, and those are
the config's (eval.during_training.resources).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from raylm.config import RaylmConfig
from raylm.pipelines.eval.evaluate import headline, plan_replicas, score_tasks, table_name
from raylm.pipelines.track.tracking import MetricSink, Tracker
from raylm.pipelines.train.checkpoint import step_of, whole_checkpoints
from raylm.pipelines.train.pretrain import train_storage
from raylm.storage import Location

# One listing of the checkpoint folder per poll: a LIST request every 2 s on object storage,
# against checkpoints minutes apart in a real run.
POLL_SECONDS = 2.0
T = TypeVar("T")


@dataclass
class Followed:
    """What the follow-evaluator did: the steps it scored, and tables the server did not take
    (the driver logs them through its tracker, which keeps what an outage misses)."""

    steps: list[int] = field(default_factory=list)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    removed: list[int] = field(default_factory=list)  # rotated away (train.keep_checkpoints) before scoring


class CheckpointFollower:
    """The follow-evaluator (run as a Ray actor by `during_training`). `run` scores until
    `finish` names the last step; the two run on two threads of the actor."""

    def __init__(self, cfg: RaylmConfig, tracking: dict, run_dir: Location, earlier: set[str]):
        self.section, self.limit = cfg.eval.during_training, cfg.eval.task_limit
        # Paths as the driver resolved them: the actor's working directory is Ray's, not the user's.
        self.tasks, self.data_dir = self.section.tasks, Path(cfg.eval.task_data_dir)
        self.run_dir, self.seen = run_dir, set(earlier)  # an earlier launch's checkpoints are not this one's
        self.sink = MetricSink(tracking["uri"], tracking["run_id"])
        self.tracker = Tracker.of_run(tracking["uri"], tracking["run_id"])
        self.ended, self.last_step = threading.Event(), None
        self.followed, self.counted, self.skipped = Followed(), 0, None

    def finish(self, last_step: int) -> None:
        self.last_step = last_step
        self.ended.set()

    def run(self) -> Followed:
        try:
            while True:
                ended = self.ended.is_set()  # read before listing: the last checkpoint is in this listing
                for checkpoint in [c for c in whole_checkpoints(self.run_dir) if c.name not in self.seen]:
                    self.seen.add(checkpoint.name)
                    self.counted += 1
                    if self.counted % self.section.every == 0:
                        self.score(checkpoint)
                    else:
                        self.skipped = checkpoint
                if ended:
                    if self.skipped is not None and step_of(self.skipped) == self.last_step:
                        self.score(self.skipped)  # the last checkpoint always
                    return self.followed
                self.ended.wait(POLL_SECONDS)
        finally:
            self.sink.close()

    def score(self, checkpoint: Location) -> None:
        step = step_of(checkpoint)
        replicas = plan_replicas(self.section.resources, "eval.during_training.resources")
        scores = unless_removed(
            checkpoint, lambda: score_tasks(checkpoint, self.tasks, self.limit, self.data_dir, replicas)
        )
        if scores is None:
            self.followed.removed.append(step)
            return
        self.sink.add(scores.flat() | {"task/seconds": scores.seconds}, step)
        self.sink.flush()
        for name, rows in scores.rows.items():
            try:
                self.tracker.log_table(rows, table_name(name, step))
            except Exception as err:  # the driver's tracker keeps it through an outage
                print(f"[evaluate] table {name} of step {step} left to the driver: {err}", flush=True)
                self.followed.tables[table_name(name, step)] = rows
        self.followed.steps.append(step)
        shown = f"{headline(scores.metrics)} ({scores.seconds:.1f} s)"
        print(f"[evaluate] during training, {checkpoint.name}: {shown}", flush=True)


def cpus_beside_training(cfg: RaylmConfig) -> float:
    """The CPUs the follow-evaluator's replicas take (a GPU replica: 1), which training's even
    share of the cluster leaves free (pretrain's `beside`)."""
    if not cfg.eval.during_training.tasks:
        return 0.0
    replicas = plan_replicas(cfg.eval.during_training.resources, "eval.during_training.resources")
    return float(replicas.size * replicas.threads)


def unless_removed(checkpoint: Location, score: Callable[[], T]) -> T | None:
    """score(); or None, with a log line, when it failed because the run deleted the checkpoint
    meanwhile (train.keep_checkpoints rotates them)."""
    try:
        return score()
    except Exception:
        if checkpoint.exists():
            raise
        print(f"[evaluate] {checkpoint.name} was removed by the run before it was scored: skipped", flush=True)
        return None


class Following:
    """The driver's handle on a running follow-evaluator."""

    def __init__(self, actor, running):
        self.actor, self.running = actor, running

    def wait(self, last_step: int) -> Followed:
        """Tell it training ended at last_step; returns once it has scored that checkpoint."""
        import ray

        self.actor.finish.remote(last_step)
        return ray.get(self.running)


@contextmanager
def during_training(cfg: RaylmConfig, tracking: dict):
    """A follow-evaluator for the training inside the block (None when
    eval.during_training.tasks is empty); killed if the block fails. It runs on the driver's
    node, where the task files are (eval.task_data_dir is a local folder), and takes no CPU
    itself: its scoring replicas take eval.during_training.resources."""
    if not cfg.eval.during_training.tasks:
        yield None
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    section = cfg.eval.during_training
    tasks = [str(Path(t).resolve()) for t in section.tasks]
    data_dir = str(Path(cfg.eval.task_data_dir).resolve())
    cfg = cfg.model_copy(deep=True)
    cfg.eval.during_training.tasks, cfg.eval.task_data_dir = tasks, data_dir
    run_dir = train_storage(cfg.run) / cfg.run.name
    earlier = {c.name for c in whole_checkpoints(run_dir)}
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    options = {"num_cpus": 0, "max_concurrency": 2, "scheduling_strategy": here}
    actor = ray.remote(CheckpointFollower).options(**options).remote(cfg, tracking, run_dir, earlier)
    try:
        yield Following(actor, actor.run.remote())
    except BaseException:
        ray.kill(actor)
        raise
