"""`raylm runs` (pipelines/track/runs.py) against a real sqlite MLflow store, filled as raylm fills it."""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

import raylm.pipelines.track.runs
from raylm.cli import main

MINUTE = 60_000
SOURCES = json.dumps([{"paths": [f"/data/tinystories/train-{i:05d}.parquet"]} for i in range(8)])


def add_run(client, exp, name, stage, minutes_ago, status, metrics=None, params=None, silent_minutes=0):
    """A run started `minutes_ago`, with metric histories {key: [values at steps 0, 10, ...]},
    last logged `silent_minutes` ago."""
    now = int(time.time() * 1000)  # not the module's import time: the suite may reach this test 20 min later
    start = now - minutes_ago * MINUTE
    run_id = client.create_run(
        exp, start_time=start, run_name=name, tags={"raylm.stage": stage, "raylm.run_name": name}
    ).info.run_id
    logged_at = now - silent_minutes * MINUTE
    batch = [
        Metric(key, value, logged_at, 10 * i)
        for key, values in (metrics or {}).items()
        for i, value in enumerate(values)
    ]
    client.log_batch(run_id, metrics=batch, params=[Param(k, str(v)) for k, v in (params or {}).items()])
    if status != "RUNNING":
        client.set_terminated(run_id, status, end_time=start + 30 * MINUTE)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Seven runs, the newest first: pretrain-f and pretrain-e RUNNING (e silent for 20 min),
    two named pretrain-a, and one each of evaluate, prepare and run."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('runs') / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("raylm")
    client.create_experiment("other")
    config = {"model.n_layer": 2, "train.lr": 0.01, "data.seq_len": 64}
    ids = {
        "a_old": add_run(
            client,
            exp,
            "pretrain-a",
            "pretrain",
            300,
            "FINISHED",
            params=config,
            metrics={
                "train_loss": [4.0, 3.0, 2.5],
                "val_loss": [3.0, 2.1, 2.3],
                "val_bits_per_byte": [1.2, 0.9, 1.0],
                "tokens_seen": [4e5, 8e5, 1.2e6],
                "cost_usd": [0.001, 0.002, 0.0031],
            },
        ),
        "b": add_run(
            client,
            exp,
            "run-b",
            "run",
            240,
            "FINISHED",
            params=config | {"model.n_layer": 4, "train.batch_size": 16, "data.sources": SOURCES},
            metrics={
                "train_loss": [3.0] * 21,
                "val_loss": [2.5, 1.9],
                "final_val_loss": [1.95],
                "final_val_bits_per_byte": [0.85],
                "tokens_seen": [2.4e6],
                "cost_usd": [0.05],
                "train_seconds": [1500.0],
                "mfu": [0.123],
                "tokens_per_s": [2600.0],
            },
        ),
        "c": add_run(client, exp, "prepare-c", "prepare", 180, "FINISHED", params={"data.seq_len": 64}),
        "d": add_run(client, exp, "eval-d", "evaluate", 120, "FAILED", metrics={"final_val_loss": [2.05]}),
        "a_new": add_run(
            client,
            exp,
            "pretrain-a",
            "pretrain",
            60,
            "KILLED",
            params=config | {"train.lr": 0.003},
            metrics={"val_loss": [2.8], "tokens_seen": [3e5], "cost_usd": [1.8e-5]},
        ),
        "e": add_run(
            client, exp, "pretrain-e", "pretrain", 30, "RUNNING", metrics={"train_loss": [3.5]}, silent_minutes=20
        ),
        "f": add_run(client, exp, "pretrain-f", "pretrain", 2, "RUNNING", metrics={"train_loss": [3.9]}),
    }
    return uri, ids


def runs(store, *args, capsys):
    """`raylm runs` on the store: (exit code, stdout, stderr)."""
    code = main(["runs", "--tracking-uri", store[0], *args])
    out, err = capsys.readouterr()
    return code, out, err


def names(out: str) -> list[str]:
    return [line.split()[0] for line in out.splitlines()[1:]]


def test_lists_newest_first_with_the_key_metrics(store, capsys):
    code, out, err = runs(store, capsys=capsys)
    assert code == 0 and err == ""
    header, *rows = out.splitlines()
    assert header.split() == [
        "name",
        "stage",
        "status",
        "started",
        "duration",
        "steps",
        "tokens",
        "best",
        "val",
        "bits/byte",
        "cost",
        "run",
        "id",
    ]
    assert names(out) == ["pretrain-f", "pretrain-e", "pretrain-a", "eval-d", "prepare-c", "run-b", "pretrain-a"]
    run_b = rows[5].split()
    # name stage status date time duration (2 words) steps tokens best-val bits/byte cost id
    assert run_b[:3] == ["run-b", "run", "FINISHED"] and run_b[5:] == [
        "30.0",
        "min",
        "200",
        "2.4M",
        "1.9000",
        "0.8500",
        "$0.05",
        store[1]["b"][:8],
    ]
    assert rows[4].split()[5:] == ["30.0", "min", *["-"] * 5, store[1]["c"][:8]]  # a prepare run trains nothing
    assert rows[3].split()[9] == "2.0500"  # evaluate only: its final score
    assert [rows[i].split()[11] for i in (2, 6)] == ["$0.000018", "$0.0031"]  # two digits below a cent


def test_best_val_loss_is_the_minimum_of_the_history(store, capsys):
    _, out, _ = runs(store, "--json", capsys=capsys)
    rows = {row["run_id"]: row for row in json.loads(out)}
    old = rows[store[1]["a_old"]]
    assert old["best_val_loss"] == 2.1  # not the last value, 2.3
    assert (old["steps"], old["tokens"], old["cost_usd"], old["bits_per_byte"]) == (20, 1.2e6, 0.0031, 1.0)
    assert old["seconds"] == 1800 and old["stage"] == "pretrain" and old["status"] == "FINISHED"


def test_a_silent_running_run_is_flagged(store, capsys):
    _, out, _ = runs(store, "--status", "running", capsys=capsys)
    assert [line.split()[:3] for line in out.splitlines()[1:]] == [
        ["pretrain-f", "pretrain", "RUNNING"],
        ["pretrain-e", "pretrain", "RUNNING?"],
    ]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--stage", "pretrain"], ["pretrain-f", "pretrain-e", "pretrain-a", "pretrain-a"]),
        (["--status", "FAILED"], ["eval-d"]),
        (["--name", "TRAIN-A"], ["pretrain-a", "pretrain-a"]),
        (["--stage", "pretrain", "--status", "killed"], ["pretrain-a"]),
        (["--limit", "2"], ["pretrain-f", "pretrain-e"]),
        # the lowest best val loss first; runs without one last, the newest first
        (
            ["--sort", "best_val_loss"],
            ["run-b", "eval-d", "pretrain-a", "pretrain-a", "pretrain-f", "pretrain-e", "prepare-c"],
        ),
        (["--sort", "best_val_loss", "--limit", "3"], ["run-b", "eval-d", "pretrain-a"]),
        (["--sort", "cost"], ["run-b", "pretrain-a", "pretrain-a", "pretrain-f", "pretrain-e", "eval-d", "prepare-c"]),
        (["--sort", "tokens", "--stage", "pretrain", "--limit", "2"], ["pretrain-a", "pretrain-a"]),
    ],
)
def test_filters_and_sorts(store, capsys, args, expected):
    _, out, _ = runs(store, *args, capsys=capsys)
    assert names(out) == expected


def test_sorting_by_best_val_loss_reads_every_page(store, capsys, monkeypatch):
    monkeypatch.setattr(raylm.pipelines.track.runs, "PAGE", 2)  # 4 pretrain runs: 2 pages
    _, out, _ = runs(store, "--sort", "best_val_loss", "--stage", "pretrain", capsys=capsys)
    assert names(out) == ["pretrain-a", "pretrain-a", "pretrain-f", "pretrain-e"]
    assert [line.split()[9] for line in out.splitlines()[1:]] == ["2.1000", "2.8000", "-", "-"]


def test_nothing_matches(store, capsys):
    code, out, err = runs(store, "--stage", "tune", capsys=capsys)
    assert code == 0 and out == "" and err == f"raylm: no matching runs in experiment 'raylm' at {store[0]}\n"


def test_compare_shows_key_metrics_and_only_the_params_that_differ(store, capsys):
    code, out, err = runs(store, "--compare", "run-b", store[1]["a_old"][:8], capsys=capsys)
    assert code == 0 and err == ""
    lines = {line.split("  ")[0]: line.split() for line in out.splitlines()}
    assert lines[""] == ["run-b", "pretrain-a"]
    assert lines["best val loss"][-2:] == ["1.9000", "2.1000"] and lines["final val loss"][-2:] == ["1.9500", "-"]
    assert lines["MFU"][-2:] == ["12.3%", "-"] and lines["train time"][-3:] == ["25.0", "min", "-"]
    params = [key for key in lines if "." in key]
    assert params == ["data.sources", "model.n_layer", "train.batch_size"]  # train.lr, data.seq_len: the same
    assert lines["train.batch_size"][-2:] == ["16", "-"]
    assert lines["data.sources"][1:] == ['[{"paths":', '["/data/tinystories/train-...', "-"]  # 40 characters


def test_compare_picks_the_newest_of_a_name_and_says_so(store, capsys):
    code, out, err = runs(store, "--compare", "pretrain-a", "pretrain-e", "--json", capsys=capsys)
    assert code == 0 and err == f"raylm: 2 runs are named 'pretrain-a': using the newest, {store[1]['a_new'][:8]}\n"
    new, running = json.loads(out)
    assert new["run_id"] == store[1]["a_new"] and new["status"] == "KILLED" and running["status"] == "RUNNING?"
    assert new["params"] == {"data.seq_len": "64", "model.n_layer": "2", "train.lr": "0.003"} and running["params"] == {
        "data.seq_len": None,
        "model.n_layer": None,
        "train.lr": None,
    }


def test_an_ambiguous_id_prefix_is_refused(store, capsys):
    ids = sorted(store[1].values())
    prefix = max((os.path.commonprefix(pair) for pair in zip(ids, ids[1:])), key=len)  # shared by 2 runs at least
    code, _, err = runs(store, "--compare", "run-b", prefix, capsys=capsys)
    assert code == 2 and err == f"raylm: error: runs: several run ids start with '{prefix}': give more of it\n"


def test_compare_of_equal_configs_says_so(store, capsys):
    _, out, _ = runs(store, "--compare", "pretrain-e", "pretrain-f", capsys=capsys)
    assert out.endswith("\n(every param is the same)\n")
    _, out, _ = runs(store, "--compare", "pretrain-e", capsys=capsys)
    assert out.splitlines()[-1].split() == ["MFU", "-"]  # one run: its metrics, nothing to compare


def test_config_gives_the_store_and_experiment(store, capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"tracking: {{tracking_uri: '{store[0]}', experiment: other}}\n")
    assert main(["runs", str(config)]) == 0
    assert capsys.readouterr().err.startswith("raylm: no matching runs in experiment 'other'")
    assert main(["runs", str(config), "--experiment", "raylm", "--compare", "eval-d", "prepare-c"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["eval-d", "prepare-c"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--experiment", "nope"],
            "no experiment 'nope' at {uri} (experiments: Default, other, raylm; pick one with --experiment)",
        ),
        (
            ["--compare", "run-b", "pretrain-z"],
            "runs: no run named 'pretrain-z', nor with an id starting so, in experiment 'raylm' at {uri}",
        ),
        (
            ["--compare", "pretrain"],
            "runs: no run named 'pretrain', nor with an id starting so, in experiment 'raylm' at {uri}",
        ),  # a name is matched whole
        (["--limit", "0"], "runs: --limit must be at least 1"),
    ],
)
def test_user_errors_are_one_line(store, capsys, args, message):
    code, _, err = runs(store, *args, capsys=capsys)
    assert code == 2 and err == f"raylm: error: {message.format(uri=store[0])}\n"


def test_a_missing_store_is_not_created(capsys, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["runs", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err == (
        f"raylm: error: no MLflow store at {uri} (give --tracking-uri, or run where the runs' mlflow.db is)\n"
    )
    assert not (tmp_path / "mlflow.db").exists()


def test_an_unreachable_server_fails_at_once(capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    started = time.perf_counter()
    assert main(["runs", "--tracking-uri", "http://127.0.0.1:9"]) == 2  # port 9 (discard): nothing listens
    err = capsys.readouterr().err
    assert err == (
        "raylm: error: no MLflow server answers at http://127.0.0.1:9 (connection refused): check --tracking-uri\n"
    )
    assert time.perf_counter() - started < 5  # MLflow's own client would retry for about 2 minutes


class Overloaded(BaseHTTPRequestHandler):
    """A server that answers every request with 503, which MLflow's client retries."""

    def do_GET(self):
        self.send_error(503)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_failing_server_is_tried_once(capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Overloaded)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_port}"
    started = time.perf_counter()
    try:
        assert main(["runs", "--tracking-uri", uri]) == 2
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert err.startswith(f"raylm: error: cannot read MLflow runs at {uri}: API request to ") and err.count("\n") == 1
    assert time.perf_counter() - started < 5  # MLflow's 7 retries with backoff would take over a minute
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # one try was for this command only


def test_runs_imports_neither_ray_nor_torch(store):
    code = (
        "import sys; from raylm.cli import main; main(['runs', '--tracking-uri', sys.argv[1]]); "
        "print(sorted({'ray', 'torch'} & set(sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code, store[0]], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "[]"
