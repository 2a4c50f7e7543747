"""Screenshots of one run in the MLflow UI, taken with headless Chromium.

Users review runs in the MLflow UI; this shows what they see. It opens the run's overview page
and one metric's chart, saves them as `run-overview.png` and `metric-<name>.png`, and prints the
overview's visible text (what `screenshot_run` returns, for a test to assert on).

    .venv/bin/python scripts/mlflow_screenshots.py --backend-store-uri sqlite:///mlflow.db \
        --run quickstart --out screenshots/
    .venv/bin/python scripts/mlflow_screenshots.py --tracking-uri http://127.0.0.1:5000 \
        --run-id 1f0c... --metric val_loss

With --backend-store-uri it starts `mlflow server` on that store (on 127.0.0.1, a free port) and
stops it at the end; with --tracking-uri it uses a server that is already running. The run is
--run (an MLflow run name, else raylm's run.name), --run-id, or else the newest run of
--experiment.

Needs Debian's Chromium and its driver (`apt-get install -y --no-install-recommends chromium
chromium-driver`) and selenium (in raylm's `dev` extra).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MLFLOW = Path(sys.executable).with_name("mlflow")  # the venv's, so that server and client agree
WINDOW = (1400, 1000)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    # Without internet access Chromium would otherwise keep retrying its own background
    # connections (updates, sync, field trials) and fill the log with refused connections.
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The UI opens its Assistant chat panel on a first visit, taking a quarter of the page. These
# MLflow 3 localStorage entries say it was shown once and closed; other versions ignore them.
ASSISTANT_CLOSED = {"mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true", "mlflow.assistant.panelOpen_v1": "false"}
# MLflow 3 shows an experiment without a type in its GenAI layout; raylm's runs are model training.
MODEL_TRAINING = "workflowType=machine_learning"
CHART_SEARCH = 'input[placeholder="Search metric charts"]'
CHART_LINE = '[role="dialog"] .js-plotly-plot .scatterlayer path.js-line'


@dataclass
class Screenshots:
    overview: Path
    metric: Path
    overview_text: str  # the overview page's visible text (document.body.innerText)
    url: str  # the run page


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        shots = screenshot_run(
            args.out,
            tracking_uri=args.tracking_uri,
            backend_store_uri=args.backend_store_uri,
            experiment=args.experiment,
            run_name=args.run,
            run_id=args.run_id,
            metric=args.metric,
            timeout=args.timeout,
        )
    except (LookupError, MlflowException, TimeoutError, RuntimeError) as err:
        print(f"mlflow_screenshots: {err}", file=sys.stderr)
        return 1
    print(shots.overview_text)
    print(f"\n{shots.url}\nsaved {shots.overview} and {shots.metric}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    store = parser.add_mutually_exclusive_group()
    store.add_argument(
        "--backend-store-uri",
        default="sqlite:///mlflow.db",
        help="start an MLflow server on this store (default: %(default)s, raylm's default store)",
    )
    store.add_argument("--tracking-uri", help="use this running MLflow server instead (http://host:port)")
    parser.add_argument("--experiment", default="raylm", help="default: %(default)s")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run", metavar="NAME", help="an MLflow run name, else raylm's run.name (the newest such run)")
    which.add_argument("--run-id", help="the run with this id")
    parser.add_argument("--metric", default="train_loss", help="the metric to chart (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("screenshots"), help="default: %(default)s/")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for each page (default: %(default)s)"
    )
    return parser.parse_args(argv)


def screenshot_run(
    out: Path,
    *,
    tracking_uri: str | None = None,
    backend_store_uri: str = "sqlite:///mlflow.db",
    experiment: str = "raylm",
    run_name: str | None = None,
    run_id: str | None = None,
    metric: str = "train_loss",
    timeout: float = 60.0,
) -> Screenshots:
    """Screenshots of a run's overview and of `metric`'s chart in `out`; the server is
    `tracking_uri`'s, or one started on `backend_store_uri` for the duration."""
    check_store(tracking_uri or backend_store_uri)
    run = find_run(MlflowClient(tracking_uri or backend_store_uri), experiment, run_name, run_id)
    if metric not in run.data.metrics:
        some = ", ".join(sorted(run.data.metrics)[:8]) or "none"
        raise LookupError(
            f"run '{run.info.run_name}' has no metric '{metric}' ({len(run.data.metrics)} metrics: {some}, ...)"
        )
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        base = (
            tracking_uri.rstrip("/") if tracking_uri else stack.enter_context(mlflow_server(backend_store_uri, timeout))
        )
        driver = stack.enter_context(headless_chromium())
        close_assistant_panel(driver, base)
        page = run_page(base, run.info.experiment_id, run.info.run_id)
        text = screenshot_overview(driver, page, run.info.run_name, metric, out / "run-overview.png", timeout)
        chart = out / f"metric-{file_name(metric)}.png"
        screenshot_metric_chart(driver, page, metric, chart, timeout)
    return Screenshots(out / "run-overview.png", chart, text, page)


def file_name(metric: str) -> str:
    return re.sub(r"[^\w.-]", "_", metric)  # system/cpu_utilization_percentage -> system_cpu_...


def check_store(uri: str) -> None:
    """Fail at once where MLflow would not: it retries an absent server for minutes and creates
    a missing sqlite file (an empty store)."""
    if uri.startswith("http") and not answers(uri.rstrip("/")):
        raise LookupError(f"no MLflow server answers at {uri}")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise LookupError(f"no MLflow store at {uri}")


def find_run(client: MlflowClient, experiment: str, run_name: str | None, run_id: str | None):
    """The run with `run_id`; else the newest run of `experiment` named `run_name` in MLflow,
    else the newest with raylm's run.name `run_name` (so `--run quickstart` finds the latest
    launch of configs/quickstart.yaml); else the experiment's newest run."""
    if run_id:
        return client.get_run(run_id)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"no experiment '{experiment}' (give another with --experiment)")
    queries = [f"attributes.run_name = '{run_name}'", f"tags.`raylm.run_name` = '{run_name}'"] if run_name else [""]
    for query in queries:
        runs = client.search_runs([found.experiment_id], query, max_results=1, order_by=["attributes.start_time DESC"])
        if runs:
            return runs[0]
    raise LookupError(f"no run {f'named {run_name!r} ' if run_name else ''}in experiment '{experiment}'")


@contextmanager
def mlflow_server(backend_store_uri: str, timeout: float = 60.0):
    """`mlflow server` on `backend_store_uri`, bound to 127.0.0.1 on a free port; yields its URL."""
    with tempfile.TemporaryDirectory(prefix="mlflow-server-") as tmp, open(Path(tmp) / "server.log", "w+") as log:
        # Artifacts that a store's runs logged straight to a local path are read from there;
        # this destination only receives uploads through the server, which a screenshot makes none of.
        port = free_port()
        server = start_server(backend_store_uri, port, Path(tmp) / "artifacts", log)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_healthy(url, server, log, timeout)
            yield url
        finally:
            stop_process_group(server)


def start_server(backend_store_uri: str, port: int, artifacts: Path, log) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port`, in a process group of its own (stopped whole)."""
    # One worker and no job runner, which would start ~8 huey processes (~1.3 GB) on this
    # 2-core machine: serving runs and metrics needs neither.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.Popen(
        [
            str(MLFLOW),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            backend_store_uri,
            "--artifacts-destination",
            str(artifacts),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def free_port() -> int:
    """A port that is free now (the server binds it a moment later; a clash fails its start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, log, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}:\n{tail(log)}")
        if answers(url):
            return
        time.sleep(0.25)
    raise TimeoutError(f"mlflow server at {url} did not answer /health within {timeout:.0f} s:\n{tail(log)}")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def tail(log, lines: int = 20) -> str:
    log.flush()
    log.seek(0)
    return "\n".join(log.read().splitlines()[-lines:])


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process and its children; SIGKILL to whatever is left after 10 s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children that outlived their parent, too
    except ProcessLookupError:
        pass
    process.wait()


@contextmanager
def headless_chromium():
    """A selenium driver for Debian's Chromium, with a fresh profile."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            yield driver
        finally:
            driver.quit()


def close_assistant_panel(driver, base: str) -> None:
    driver.get(f"{base}/health")  # any page of the origin gives access to its localStorage
    for key, value in ASSISTANT_CLOSED.items():
        driver.execute_script("window.localStorage.setItem(arguments[0], arguments[1])", key, value)


def run_page(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def screenshot_overview(driver, page: str, run_name: str, metric: str, png: Path, timeout: float) -> str:
    """The overview tab once it shows the run's name and `metric` (in its metrics table);
    returns the page's visible text."""
    driver.get(f"{page}?{MODEL_TRAINING}")
    wait_until(
        driver,
        lambda d: run_name in body_text(d) and metric in body_text(d),
        f"the run name '{run_name}' and metric '{metric}'",
        timeout,
    )
    wait_until(driver, animations_done, "the end of its animations", timeout)
    driver.save_screenshot(str(png))
    return body_text(driver)


def screenshot_metric_chart(driver, page: str, metric: str, png: Path, timeout: float) -> None:
    """The "Model metrics" tab's chart of `metric`, opened full screen, once plotly has drawn its line."""
    driver.get(f"{page}/model-metrics?{MODEL_TRAINING}")
    # A run with many metrics has many chart sections, and charts out of view are not drawn:
    # the tab's own search leaves only the charts whose names contain `metric`.
    search = wait_until(
        driver, lambda d: d.find_elements(By.CSS_SELECTOR, CHART_SEARCH), "its chart search box", timeout
    )
    search[0].send_keys(metric)
    card = wait_until(driver, lambda d: chart_card(d, metric), f"a chart card titled '{metric}'", timeout)
    card.find_element(By.CSS_SELECTOR, '[data-component-id="fullscreen_button_chartcard"]').click()
    wait_until(
        driver,
        lambda d: any(line.get_attribute("d") for line in d.find_elements(By.CSS_SELECTOR, CHART_LINE)),
        f"the full-screen chart of '{metric}' with a drawn line",
        timeout,
    )
    wait_until(driver, animations_done, "the end of its animations", timeout)  # the dialog zooms in
    driver.save_screenshot(str(png))


def chart_card(driver, metric: str):
    """The chart card whose title (its first line of text) is `metric`, or None."""
    for card in driver.find_elements(By.CSS_SELECTOR, '[data-testid="experiment-view-compare-runs-card"]'):
        if card.text.splitlines()[:1] == [metric]:
            return card
    return None


def body_text(driver) -> str:
    return driver.execute_script("return document.body.innerText")


def animations_done(driver) -> bool:
    """No finite CSS animation or transition is running (an endless one, a spinner, is ignored)."""
    return driver.execute_script(
        "return document.getAnimations().every(a => a.playState !== 'running'"
        " || a.effect.getComputedTiming().iterations === Infinity)"
    )


def wait_until(driver, condition, what: str, timeout: float):
    """WebDriverWait(condition), failing with what was awaited and what the page showed instead.
    An element that React replaced while it was read counts as not there yet."""
    try:
        return WebDriverWait(
            driver, timeout, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException]
        ).until(condition)
    except TimeoutException:
        shown = " | ".join(body_text(driver).split("\n")[:40])
        raise TimeoutError(
            f"{driver.current_url} did not show {what} within {timeout:.0f} s; it showed: {shown}"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
