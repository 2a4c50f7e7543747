"""Exact resume on real Ray Train: a run stopped by its token budget and relaunched gives the
same per-step losses as a run that never stopped."""

from mlflow.tracking import MlflowClient

from raylm.cli import main

from .conftest import REPO, tiny_overrides

STEPS, STOP = 16, 6


def pretrain(tmp, name: str, extra: list[str] = ()) -> int:
    overrides = [*tiny_overrides(tmp), f"run.name={name}", f"train.max_steps={STEPS}", "train.log_interval=1",
                 "train.eval_interval=100", "train.checkpoint_interval=100", "train.warmup_steps=3", *extra]
    return main(["pretrain", str(REPO / "configs" / "quickstart.yaml"), *[x for o in overrides for x in ("--set", o)]])


def losses(client: MlflowClient, run) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}


def test_stopped_and_resumed_run_has_the_losses_of_an_uninterrupted_one(ray_cluster, tmp_path):
    prepare = [*tiny_overrides(tmp_path)]
    assert main(["prepare", str(REPO / "configs" / "quickstart.yaml"), *[x for o in prepare for x in ("--set", o)]]) == 0
    tokens_per_step = 16 * 64  # train.batch_size x data.seq_len of tiny_overrides
    assert pretrain(tmp_path, "straight") == 0
    assert pretrain(tmp_path, "stopped", [f"train.max_tokens={STOP * tokens_per_step}"]) == 0
    run_dir = tmp_path / "runs" / "train" / "stopped"
    assert sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()) == [f"checkpoint_{STOP:06d}"]  # stopped cleanly
    assert pretrain(tmp_path, "stopped") == 0  # the same run name resumes from that checkpoint

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("raylm").experiment_id], order_by=["start_time ASC"])
    straight, first, second = (r for r in runs if r.info.run_name.startswith("pretrain-"))
    assert sorted(losses(client, first)) == list(range(1, STOP + 1))
    assert sorted(losses(client, second)) == list(range(STOP + 1, STEPS + 1))
    assert {**losses(client, first), **losses(client, second)} == losses(client, straight)  # bit for bit
    assert second.data.metrics["cost_usd"] > first.data.metrics["cost_usd"]  # training time accumulates
