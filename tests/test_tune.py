"""`raylm tune` on real Ray Tune over real Ray Train runs, a real MLflow store and real Optuna;
the sweep file's checks, trial budgets and the scaling-law fit on their own."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from raylm.cli import main
from raylm.config import load_raw, validate
from raylm.errors import ConfigError
from raylm.tuning.scaling_law import TooFewPoints, fit_law, recommend
from raylm.tuning.space import LimitSection, SweepSpec, load_sweep, trial_config, trial_steps
from tests.conftest import REPO, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"
TRIAL_STEPS = 20
SWEEP = {
    "search": {"algorithm": "grid"},
    "scheduler": {"name": "asha", "grace_period": 5, "reduction_factor": 2},
    "budget": {"trial": {"tokens": TRIAL_STEPS * 16 * 64}},  # 20 steps of 16 windows x 64 tokens
    "space": {
        "train.lr": {"grid": [1e-2, 5e-3, 3e-3, 1e-6]},  # the last one barely moves the weights
        "model.n_kv_head": {"grid": [2, 3]},  # 3 does not divide n_head=4: those trials are pruned
    },
}


def sweep_args(tmp: Path, space: dict, name: str) -> list[str]:
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(space))
    overrides = tiny_overrides(tmp) + [
        f"run.name={name}",
        "scaling.num_workers=1",
        "train.eval_interval=5",
        "eval.sample_tokens=0",
    ]
    return [
        "tune",
        str(QUICKSTART),
        "--space",
        str(tmp / f"{name}.yaml"),
        *[x for o in overrides for x in ("--set", o)],
    ]


def sweep_runs(tmp: Path, name: str):
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("raylm").experiment_id
    parent = client.search_runs([exp], filter_string=f"tags.`raylm.stage` = 'tune' and tags.`raylm.sweep` = '{name}'")
    assert len(parent) == 1
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    return client, parent[0], children


@pytest.fixture(scope="module")
def sweep(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    assert main(sweep_args(tmp, SWEEP, "grid")) == 0
    return tmp


def interrupt_when(ready, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGINT)


def result_lines(tmp: Path, name: str) -> dict[str, int]:
    """Reports per trial in Tune's own records."""
    return {
        json.loads(p.read_text().splitlines()[0])["trial_id"]: len(p.read_text().splitlines())
        for p in (tmp / "runs" / "tune" / name).glob("*/result.json")
        if p.read_text().strip()
    }


def trials(tmp: Path, name: str) -> list[dict]:
    """The sweep run's trials table, one dict per trial."""
    client, parent, _ = sweep_runs(tmp, name)
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "trials.json", str(tmp))).read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def test_sweep_trains_every_valid_trial_and_prunes_the_rest_with_a_reason(sweep):
    rows = trials(sweep, "grid")
    assert len(rows) == 8
    pruned = [r for r in rows if r["status"] == "pruned"]
    assert sorted(r["model.n_kv_head"] for r in pruned) == [3] * 4
    _, _, children = sweep_runs(sweep, "grid")
    reasons = [c.data.tags["raylm.prune_reason"] for c in children if c.data.tags["raylm.trial_status"] == "pruned"]
    assert len(reasons) == 4 and all("n_kv_head=3" in r for r in reasons)


def test_asha_stops_the_bad_learning_rate_early(sweep):
    rows = {(r["train.lr"], r["model.n_kv_head"]): r for r in trials(sweep, "grid")}
    assert rows[(1e-2, 2)]["status"] == "completed" and rows[(1e-2, 2)]["step"] == TRIAL_STEPS
    bad = rows[(1e-6, 2)]
    assert bad["status"] == "early_stopped" and bad["step"] < TRIAL_STEPS
    assert bad["val_loss"] > rows[(1e-2, 2)]["val_loss"]


def test_mlflow_nests_one_finished_child_run_per_trial_under_the_sweep(sweep):
    client, parent, children = sweep_runs(sweep, "grid")
    assert len(children) == 8 and parent.info.status == "FINISHED"
    assert {c.info.status for c in children} == {"FINISHED"}  # none left RUNNING, stopped ones included
    done = [c for c in children if c.data.tags["raylm.trial_status"] == "completed"]
    assert done and all("final_val_loss" in c.data.metrics and "cost_usd" in c.data.metrics for c in done)
    assert all(c.data.params["scaling.cpus_per_worker"] == "0.99" for c in done)  # two 1-worker trials per 2 CPUs
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "trials.json", "sweep.yaml", "config.yaml", "plots"} <= artifacts
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "plots")] == ["plots/val_loss_vs_compute.png"]
    m = parent.data.metrics
    assert (m["trials_completed"] + m["trials_early_stopped"], m["trials_pruned"]) == (4, 4)
    assert m["sweep_flops_seen"] > 0 and m["best_val_loss"] == min(c.data.metrics["final_val_loss"] for c in done)


def test_best_config_reproduces_its_trials_loss_with_raylm_run(sweep):
    rows = [r for r in trials(sweep, "grid") if r["status"] == "completed"]
    best = min(rows, key=lambda r: r["val_loss"])
    best_config = sweep / "runs" / "tune" / "grid" / "best_config.yaml"
    assert best["trial_id"] in best_config.read_text()
    assert main(["run", str(best_config)]) == 0
    client = MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    run = client.search_runs(
        [client.get_experiment_by_name("raylm").experiment_id], filter_string="tags.`raylm.run_name` = 'grid-best'"
    )[0]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_loss")}
    assert history[TRIAL_STEPS] == pytest.approx(best["val_loss"], abs=1e-6)  # same seed, data, threads: same loss


@pytest.mark.slow  # two sweeps of a Ctrl-C'd and resumed run, ~130 s
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_cluster, tmp_path):
    space = {
        "search": {"algorithm": "grid", "max_concurrent_trials": 1},
        "scheduler": {"name": "fifo"},
        "budget": {"trial": {"tokens": 10 * 16 * 64}},
        "space": {"train.lr": {"grid": [1e-2, 5e-3]}},
    }
    args = sweep_args(tmp_path, space, "resumable")
    train_runs = tmp_path / "runs" / "train"
    # Ctrl-C once the second trial's Train run exists: Tune stops it and saves its state.
    interrupter = threading.Thread(
        target=interrupt_when, args=(lambda: len(list(train_runs.glob("resumable-*"))) >= 2,)
    )
    interrupter.start()
    assert main(args) == 130
    interrupter.join()
    client, parent, children = sweep_runs(tmp_path, "resumable")
    assert parent.info.status == "KILLED"
    finished = [c.data.tags["raylm.trial_id"] for c in children if c.data.tags.get("raylm.trial_status") == "completed"]
    assert len(finished) == 1
    before = result_lines(tmp_path, "resumable")
    assert main(args + ["--resume"]) == 0
    after = result_lines(tmp_path, "resumable")
    assert after[finished[0]] == before[finished[0]]  # the finished trial reported nothing more
    client, parent, children = sweep_runs(tmp_path, "resumable")
    assert parent.info.status == "FINISHED" and len(children) == 2  # the restarted trial reopened its run
    assert {c.data.tags["raylm.trial_status"] for c in children} == {"completed"}


# -- the sweep file, without Ray -------------------------------------------------------------


def write_spec(tmp: Path, spec: dict) -> Path:
    path = tmp / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    "space, message",
    [
        ({"model.n_hed": {"choice": [2, 4]}}, "unknown key model.n_hed (did you mean model.n_head?)"),
        ({"train.lr": {"choice": [1e-3, "fast"]}}, "space.train.lr: Input should be a valid number"),
        ({"train.lr": {"loguniform": [0, 1e-2]}}, "space.train.lr: loguniform needs 0 < low < high"),
        ({"train.warmup_steps": {"randint": [10, 5]}}, "space.train.warmup_steps: randint needs low < high"),
        (
            {"train.lr": {"normal": [0, 1]}},
            "space.train.lr: expected one of choice, grid, uniform, loguniform, randint",
        ),
        ({"model.n_layer": {"choice": [0, 2]}}, "space.model.n_layer: Input should be greater than 0 (got 0)"),
    ],
)
def test_bad_space_fails_before_ray_naming_the_key(tmp_path, space, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(write_spec(tmp_path, {"space": space}), load_raw(QUICKSTART))
    assert message in str(err.value)


def test_optuna_refuses_grid_and_grid_refuses_distributions(tmp_path):
    with pytest.raises(ConfigError, match="optuna samples; it cannot take grid entries"):
        load_sweep(
            write_spec(tmp_path, {"search": {"algorithm": "optuna"}, "space": {"train.lr": {"grid": [1e-3]}}}), {}
        )
    with pytest.raises(ConfigError, match="grid needs every space entry to be a grid"):
        load_sweep(
            write_spec(tmp_path, {"search": {"algorithm": "grid"}, "space": {"train.lr": {"uniform": [0.1, 1]}}}), {}
        )


def test_a_combination_that_cannot_train_is_pruned_with_the_reason():
    cfg, reason = trial_config(load_raw(QUICKSTART), {"model.n_head": 3})
    assert cfg is None and "n_embd=128 must be divisible by n_head=3" in reason
    cfg, reason = trial_config(load_raw(QUICKSTART), {"model.n_head": 8, "train.lr": 1e-3})
    assert reason is None and (cfg.model.n_head, cfg.train.lr) == (8, 1e-3)


def test_optuna_proposes_values_in_the_space_through_ray_tune(tmp_path):
    from raylm.tuning.sweep import make_search, tune_space

    spec = SweepSpec.model_validate(
        {
            "search": {"algorithm": "optuna", "seed": 3},
            "space": {
                "train.lr": {"loguniform": [1e-4, 1e-2]},
                "model.n_layer": {"choice": [2, 4]},
                "train.warmup_steps": {"randint": [0, 1]},
            },
        }
    )
    searcher = make_search(spec, concurrency=2)
    assert searcher.set_search_properties("val_loss", "min", tune_space(spec))
    proposals = [searcher.suggest(f"t{i}") for i in range(2)]
    assert searcher.suggest("t2") is None  # held back: two trials at once
    for config in proposals:
        assert 1e-4 <= config["train.lr"] <= 1e-2 and config["model.n_layer"] in (2, 4)
        assert config["train.warmup_steps"] in (0, 1)  # randint's high is inclusive in the sweep file
    searcher.on_trial_complete("t0", {"val_loss": 3.0, "training_iteration": 1})
    assert searcher.suggest("t2") is not None


def test_trial_budget_sets_the_steps_and_sweep_budget_says_what_was_spent():
    from raylm.tuning.space import sweep_spent

    assert trial_steps(1024, 1000, LimitSection(tokens=20480)) == 20
    assert trial_steps(1024, 1000, LimitSection(tokens=20480, flops=1000 * 10240)) == 10  # the tighter one wins
    assert trial_steps(1024, 1000, LimitSection(hours=1)) is None
    spent = {
        "a": {"tokens_seen": 600, "flops_seen": 6e5, "cost_usd": 0.5},
        "b": {"tokens_seen": 500, "flops_seen": 5e5},
    }
    assert sweep_spent(spent, LimitSection(tokens=2000, usd=1.0), hours=0.1) is None
    assert sweep_spent(spent, LimitSection(tokens=1000), hours=0.1) == "budget.sweep.tokens=1000 spent (1,100)"
    assert sweep_spent(spent, LimitSection(hours=0.05), hours=0.1) == "budget.sweep.hours=0.05 spent (0.100 h)"


def chinchilla_points(noise: float = 0.0) -> tuple[list, list, list]:
    """Losses from a known law (the Chinchilla paper's fitted constants), over a 4 x 4 grid."""
    rng = random.Random(0)
    n, d, loss = [], [], []
    for size in (2e6, 8e6, 3e7, 1e8):
        for tokens in (5e7, 2e8, 8e8, 3e9):
            n.append(size)
            d.append(tokens)
            loss.append((1.69 + 406.4 / size**0.34 + 410.7 / tokens**0.28) * (1 + rng.gauss(0, noise)))
    return n, d, loss


def test_scaling_law_fit_recovers_a_known_law_and_its_compute_optimum():
    n, d, loss = chinchilla_points(noise=0.002)
    fit = fit_law(n, d, loss)
    assert fit.alpha == pytest.approx(0.34, abs=0.05) and fit.beta == pytest.approx(0.28, abs=0.05)
    assert fit.loo_rel_error < 0.01
    rec = recommend(fit, 1e21, largest_trial_flops=6 * 1e8 * 3e9)
    true_a = 0.28 / (0.34 + 0.28)  # N_opt grows as C^(beta / (alpha + beta))
    assert math.log10(rec["params"]) == pytest.approx(math.log10(fit.optimum(1e21)[0]))
    assert rec["params"] * rec["tokens"] * 6 == pytest.approx(1e21, rel=1e-6)
    assert fit.beta / (fit.alpha + fit.beta) == pytest.approx(true_a, abs=0.05)


def test_scaling_law_refuses_to_extrapolate_from_too_few_or_too_alike_points():
    n, d, loss = chinchilla_points()
    with pytest.raises(TooFewPoints, match="5 finished trials; the fit has 5 parameters"):
        fit_law(n[:5], d[:5], loss[:5])
    same_size = [i for i in range(16) if n[i] in (2e6, 8e6)]
    with pytest.raises(TooFewPoints, match="2 distinct model size"):
        fit_law([n[i] for i in same_size], [d[i] for i in same_size], [loss[i] for i in same_size])
    iso = [(size, 1e16 / (6 * size)) for size in (2e6, 8e6, 3e7, 1e8) for _ in range(3)]
    with pytest.raises(TooFewPoints, match="every trial used the same compute"):
        fit_law([a for a, _ in iso], [b * (1 + i * 1e-4) for i, (_, b) in enumerate(iso)], [3.0] * 12)


def test_resume_modes(tmp_path):
    """--resume needs a sweep; without it an existing sweep is an error; --resume auto (a
    cluster job's retry) continues one if there is one, else starts."""
    from raylm.tuning.sweep import STATE, wants_resume

    sweep_dir = tmp_path / "tune" / "grid"
    assert wants_resume(sweep_dir, "auto") is False and wants_resume(sweep_dir, False) is False
    with pytest.raises(ConfigError, match="--resume: no sweep to resume"):
        wants_resume(sweep_dir, True)
    sweep_dir.mkdir(parents=True)
    (sweep_dir / STATE).write_text("{}")
    with pytest.raises(ConfigError, match="already has a sweep"):
        wants_resume(sweep_dir, False)
    (sweep_dir / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    assert wants_resume(sweep_dir, "auto") is True and wants_resume(sweep_dir, True) is True


def test_max_concurrent_takes_the_sweep_file_s_number_with_no_worker_up():
    """A RayJob's cluster starts with 0 workers: what is up says nothing then, the file's number does."""
    from raylm.tuning.capacity import max_concurrent

    cfg = validate(load_raw(QUICKSTART, ["scaling.use_gpu=true"]), "test")  # 2 workers
    spec = SweepSpec.model_validate({"search": {"max_concurrent_trials": 3}, "space": {"train.lr": 1e-3}})
    assert max_concurrent(spec, cfg.scaling, 2.0, {"CPU": 0.0, "GPU": 0.0}) == 3
    unset = SweepSpec.model_validate({"space": {"train.lr": 1e-3}})
    with pytest.raises(ConfigError, match=r"^search\.max_concurrent_trials: one trial needs 4\.01 CPUs and 2 GPUs"):
        max_concurrent(unset, cfg.scaling, 2.0, {})
    assert max_concurrent(unset, cfg.scaling, 2.0, {"CPU": 32.0, "GPU": 4.0}) == 2  # 4 GPUs / 2, not 32 / 4.01
    larger = SweepSpec.model_validate({"space": {"scaling.num_workers": {"choice": [2, 4]}}})
    assert max_concurrent(larger, cfg.scaling, 2.0, {"CPU": 32.0, "GPU": 4.0}) == 1  # the largest trial counts
