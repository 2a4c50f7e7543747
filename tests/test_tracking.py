"""The worker-side metric sink on a real MLflow store: everything arrives, in batches, from a
background thread; an unreachable server costs the training loop nothing and the loss of
metrics is reported, not raised. On the driver's side, prepared data becomes the run's dataset
input."""

import json

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
