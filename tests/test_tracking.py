"""The worker-side metric sink on a real MLflow store: everything arrives, in batches, from a
background thread; an unreachable server costs the training loop nothing and the loss of
metrics is reported, not raised. On the driver's side, prepared data becomes the run's dataset
input."""

import json
import time

from mlflow.tracking import MlflowClient

from raylm.pipelines.track.tracking import MetricSink, Tracker


def test_sink_delivers_every_metric(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("sink")).info.run_id
    sink = MetricSink(uri, run_id)
    for step in range(1, 1201):  # 2400 values: three log_batch calls of at most 1000
        sink.add({"train_loss": 1.0 / step, "lr": 0.1}, step)
        if step % 100 == 0:
            sink.flush()
    sink.close()
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 1201))
    assert len(client.get_metric_history(run_id, "lr")) == 1200


def test_deliver_returns_once_every_metric_so_far_is_in_the_store(tmp_path):
    """What the loop calls before a checkpoint: a driver killed right after the save must not
    take steps up to it with it (flush alone returns before anything is sent)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("deliver")).info.run_id
    sink = MetricSink(uri, run_id)
    for step in range(1, 1501):  # two log_batch calls
        sink.add({"train_loss": 1.0 / step}, step)
    sink.deliver()
    assert len(client.get_metric_history(run_id, "train_loss")) == 1500
    sink.close()


def test_deliver_does_not_wait_out_an_outage(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    sink = MetricSink("http://127.0.0.1:9", "0" * 32)  # nothing listens
    sink.CLOSE_SECONDS = 1.0
    sink.add({"train_loss": 2.0}, 1)
    started = time.monotonic()
    sink.deliver()  # the first send fails: the outage begins, and deliver stops waiting
    sink.deliver()  # already in an outage: returns at once
    assert time.monotonic() - started < sink.DELIVER_SECONDS
    sink.close()


def test_sink_survives_an_unreachable_server(monkeypatch, capfd):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast instead of ~2 min of retries
    sink = MetricSink("http://127.0.0.1:9", "0" * 32)  # port 9 (discard): nothing listens
    sink.CLOSE_SECONDS = 3.0
    sink.add({"train_loss": 2.0}, 1)
    sink.flush()  # returns at once; the sender thread meets the error
    sink.add({"train_loss": 1.5}, 2)
    sink.close()
    err = capfd.readouterr().err
    assert "could not log metrics" in err and "2 metric values could not be delivered" in err


def test_prepared_data_is_logged_as_the_run_s_dataset_input(tmp_path):
    """Built from the dataset's public fields (MLflow's Dataset entity), not its private
    conversion; and the system-metrics monitor starts and stops with the run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "data" / "c16e64c01934"
    folder.mkdir(parents=True)
    with Tracker(uri, "datasets", "run", {}, system_metrics=True) as tracker:
        assert tracker.monitor is not None
        tracker.log_dataset(str(folder), 64, "grammar", "training")
    (logged,) = MlflowClient(uri).get_run(tracker.run_id).inputs.dataset_inputs
    dataset = logged.dataset
    assert (dataset.name, dataset.digest, dataset.source_type) == ("grammar", "c16e64c01934", "local")
    assert json.loads(dataset.source) == {"uri": str(folder)}
    (column,) = json.loads(dataset.schema)["mlflow_colspec"]
    assert column["name"] == "tokens" and column["tensor-spec"] == {"dtype": "int32", "shape": [-1, 65]}
    assert [(t.key, t.value) for t in logged.tags] == [("mlflow.data.context", "training")]


def test_driver_outage_at_the_end_keeps_what_was_missed_and_the_next_command_delivers_it(tmp_path, monkeypatch, capfd):
    """A real `mlflow server` stops before the run's end: the final metrics, an artifact from a
    temporary folder, a tag, the loss curve and the FINISHED status wait in a pending file
    (nothing raises); with the server back on the same port, the next Tracker's deliver_pending
    sends them and sets FINISHED with the run's real end time."""
    import tempfile
    from pathlib import Path

    from raylm.pipelines.track.tracking import deliver_pending
    from tests.mlflow_server import MlflowServer

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # connection refused at once
    server = MlflowServer(tmp_path).start()
    pending = tmp_path / "runs" / "mlflow_pending"
    handlers = {"loss_curve": lambda t: t.log_text("drawn after the outage", "plots/curve.txt")}
    try:
        with Tracker(server.url, "outage", "run", {}) as tracker:
            tracker.keep_undelivered(pending, handlers)
            tracker.log_metrics({"train_loss": 2.0}, 1)
            server.stop()
            tracker.log_metrics({"final_val_loss": 1.5, "final_val_bits_per_byte": 0.9})
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "model").mkdir()
                (Path(tmp) / "model" / "config.json").write_text('{"n": 1}')
                tracker.log_artifact(Path(tmp) / "model", "model")
            tracker.attempt({"kind": "loss_curve"}, lambda: 1 / 0)  # offline: never called
            tracker.set_tags({"raylm.checkpoint": "/ckpt"})
        err = capfd.readouterr().err
        assert "does not answer (connection refused)" in err
        assert (
            "not delivered: model/, plots/ (the loss curve), 2 metrics, 1 tag, status FINISHED; "
            f"kept in {pending / (tracker.run_id + '.json')}"
        ) in err
        record = json.loads((pending / f"{tracker.run_id}.json").read_text())
        assert record["status"] == "FINISHED" and record["uri"] == server.url
        (copy,) = [a["path"] for a in record["actions"] if a["kind"] == "artifact"]
        assert (Path(copy) / "config.json").read_text() == '{"n": 1}'  # the temporary original is gone

        server.start()
        client = MlflowClient(server.url)
        assert client.get_run(tracker.run_id).info.status == "RUNNING"
        later = Tracker(server.url, "outage", "next", {})
        assert deliver_pending(later, pending, handlers) == [tracker.run_id]
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and run.info.end_time == record["end_time"]
        assert run.data.metrics == {"train_loss": 2.0, "final_val_loss": 1.5, "final_val_bits_per_byte": 0.9}
        assert run.data.tags["raylm.checkpoint"] == "/ckpt"
        assert {f.path for f in client.list_artifacts(tracker.run_id)} == {"model", "plots"}
        assert not list(pending.glob("*.json")) and not (pending / tracker.run_id).exists()
        assert "delivered to run" in capfd.readouterr().out
    finally:
        server.stop()


def test_a_failure_that_is_no_outage_still_raises(tmp_path):
    """Only an unreachable server is waited out: a local store's error raises as before."""
    import pytest
    from mlflow.exceptions import MlflowException

    with Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "errors", "run", {}) as tracker:
        tracker.keep_undelivered(tmp_path / "pending", {})
        tracker.log_params({"a": 1})
        with pytest.raises(MlflowException):
            tracker.log_params({"a": 2})  # a param cannot change
    assert not (tmp_path / "pending").exists()
