"""Errors a user can fix. The CLI prints them as one line on stderr and exits non-zero;
anything else is a bug and keeps its traceback."""


class RaylmError(Exception):
    """Base class for problems in the user's input or environment."""

    exit_code = 2


class ConfigError(RaylmError):
    """A config file or override that does not match the typed config tree."""


class DataError(RaylmError):
    """Input data that is missing or unusable."""


class ClusterError(RaylmError):
    """Kubernetes or a Ray cluster is unreachable, or refuses a request (no kubeconfig, no
    KubeRay CRD, no permission)."""


class IncompatibleVersion(RaylmError):
    """An installed Ray, MLflow or torch lacks an API that raylm relies on outside the library's
    public surface (pipelines/runtime.py `require`): the versions pyproject.toml pins have it."""


class TrainingFailed(RaylmError):
    """The training workers raised (e.g. a NaN loss); Ray has printed their traceback."""

    exit_code = 1


class Interrupted(RaylmError):
    """A SIGTERM stopped the run early, after a final checkpoint."""

    exit_code = 143  # 128 + SIGTERM, what the shell reports for a process the signal ended


class SweepInterrupted(Interrupted):
    """Ctrl-C stopped a Tune sweep; Tune saved its state and --resume continues it."""

    exit_code = 130  # 128 + SIGINT
