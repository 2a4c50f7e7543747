"""The APIs raylm takes from Ray and MLflow although they do not publish them, each checked where
it is used: present in the versions installed (the ones pyproject.toml pins), and, where one is
gone, a failure in one line that names it and the version that has it. Stand-in modules are
plain namespaces; nothing of Ray or MLflow is patched."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from raylm.errors import IncompatibleVersion
from raylm.pipelines.runtime import private_module, require
from raylm.pipelines.track.tracking import system_metrics_monitor
from raylm.tuning.trial import check_tune_session


def test_every_private_api_raylm_uses_is_in_the_installed_versions():
    constants = private_module("ray._private.ray_constants", "ray")
    assert isinstance(require(constants, "ENABLE_RAY_CLUSTER", "ray"), bool)  # loopback_node
    check_tune_session()  # tune_stop_event
    monitor = system_metrics_monitor()  # start_system_metrics
    assert monitor.__name__ == "SystemMetricsMonitor"


def test_a_missing_attribute_fails_in_one_line_naming_the_tested_version():
    from importlib.metadata import version

    constants = SimpleNamespace(__name__="ray._private.ray_constants")  # a Ray that dropped the flag
    with pytest.raises(IncompatibleVersion) as err:
        require(constants, "ENABLE_RAY_CLUSTER", "ray")
    assert str(err.value) == (
        f"raylm needs ray._private.ray_constants.ENABLE_RAY_CLUSTER (ray 2.60 has it); "
        f"ray {version('ray')} lacks it: install ray==2.60.*"
    )


def test_a_missing_module_fails_the_same_way_but_a_missing_dependency_of_it_does_not():
    with pytest.raises(IncompatibleVersion, match=r"^raylm needs ray\._private\.no_such_module \(ray 2\.60 has it\)"):
        private_module("ray._private.no_such_module", "ray")
    with pytest.raises(IncompatibleVersion, match=r"^raylm needs no_such_package "):
        private_module("no_such_package", "ray")


def test_a_tune_session_without_the_stop_event_fails_before_the_sweep():
    class TrainSession:
        def reset(self):
            self.result_queue = None  # no stop_event any more

    session = SimpleNamespace(__name__="ray.train._internal.session", get_session=lambda: None)
    with pytest.raises(IncompatibleVersion, match=r"needs ray\.train\._internal\.session\._TrainSession \("):
        check_tune_session(session)
    session._TrainSession = TrainSession
    with pytest.raises(IncompatibleVersion, match=r"needs ray\.train\._internal\.session\._TrainSession\.stop_event "):
        check_tune_session(session)


def test_a_system_metrics_monitor_that_changed_shape_fails_at_start():
    class SystemMetricsMonitor:
        def __init__(self, run_id, sampling_interval=10):  # no tracking_uri any more
            pass

        def start(self):
            pass

        def finish(self):
            pass

    module = SimpleNamespace(__name__="mlflow.system_metrics.system_metrics_monitor")
    with pytest.raises(IncompatibleVersion, match=r"needs mlflow\.system_metrics\.system_metrics_monitor\.Sys"):
        system_metrics_monitor(module)
    module.SystemMetricsMonitor = SystemMetricsMonitor
    with pytest.raises(IncompatibleVersion, match=r"needs SystemMetricsMonitor\(tracking_uri=\.\.\.\) \(mlflow 3\.17 "):
        system_metrics_monitor(module)
