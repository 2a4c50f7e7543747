"""A real `mlflow server` on 127.0.0.1 for tests, started and stopped with
scripts/mlflow_screenshots.py's own functions; stopped and started again on the same port to
make an outage."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script():
    """scripts/mlflow_screenshots.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("mlflow_screenshots", REPO / "scripts" / "mlflow_screenshots.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


class MlflowServer:
    def __init__(self, root: Path):
        self.script = load_script()
        self.root, self.port = root, self.script.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> MlflowServer:
        log = open(self.root / "server.log", "a+")
        self.proc = self.script.start_server(
            f"sqlite:///{self.root / 'mlflow.db'}", self.port, self.root / "artifacts", log
        )
        self.script.wait_until_healthy(self.url, self.proc, log, timeout)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.script.stop_process_group(self.proc)
        self.proc = None
