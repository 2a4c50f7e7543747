"""`raylm cluster render|validate|apply|status|logs|delete` and `raylm submit`: argument parsing
and output. Rendering needs only the config; the Kubernetes client (cluster/kube.py) and Ray's
job client (cluster/submit.py) are imported by the commands that talk to a cluster."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import yaml

from raylm.cli.common import Command, add_commands, config_args, config_source, parser_for, resolve_config
from raylm.cli.stages import COMMANDS as STAGE_COMMANDS
from raylm.cli.stages import STAGES
from raylm.cluster.manifests import dump, k8s_name
from raylm.cluster.render import JOB_COMMANDS, render_cluster, render_job, render_platform
from raylm.cluster.validate import check
from raylm.config import RaylmConfig, load_raw, validate
from raylm.errors import ConfigError

# --- raylm cluster ---------------------------------------------------------------------------


def target_args(p: argparse.ArgumentParser) -> None:
    """The config, and which of its objects: the RayJob or the --interactive RayCluster."""
    config_args(p)
    p.add_argument("--interactive", action="store_true", help="a long-lived RayCluster instead of a RayJob")


def render_args(p: argparse.ArgumentParser) -> None:
    target_args(p)
    p.add_argument("--job", default="run", choices=JOB_COMMANDS, help="the raylm command the RayJob runs (default run)")
    p.add_argument("--space", type=Path, metavar="YAML", help="the sweep file, with --job tune")
    p.add_argument(
        "--platform",
        action="store_true",
        help="the namespace's shared objects instead: run volume, MLflow server, NetworkPolicy",
    )


def render_out_args(p: argparse.ArgumentParser) -> None:
    render_args(p)
    p.add_argument("--out", type=Path, metavar="FILE", help="write to FILE instead of stdout")


def apply_args(p: argparse.ArgumentParser) -> None:
    render_args(p)
    p.add_argument("--file", type=Path, metavar="FILE", help="apply this manifest file instead of rendering")


def logs_args(p: argparse.ArgumentParser) -> None:
    target_args(p)
    p.add_argument("--follow", "-f", action="store_true", help="keep streaming until the pod ends")


def validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", type=Path, help="YAML manifests (several objects per file are fine)")
    p.add_argument("--crds", type=Path, metavar="DIR", help="folder with the KubeRay CRDs (ray.io_rayjobs.yaml, ...)")


def rendered(args: argparse.Namespace) -> list[dict]:
    raw = load_raw(*config_source(args))
    if args.platform:
        return render_platform(raw)
    if args.interactive:
        return render_cluster(raw)
    return render_job(raw, args.job, args.space.read_text() if args.space else None)


def checked(docs: list[dict]) -> list[dict]:
    """Lint always; core kinds' schemas when kubernetes-validate is installed (the `cluster`
    extra); the KubeRay CRD schemas need the CRD files (`raylm cluster validate --crds`)."""
    problems = check(docs, crd_dir=None, core=importlib.util.find_spec("kubernetes_validate") is not None)
    if problems:
        raise ConfigError("the rendered manifests break raylm's rules: " + "; ".join(problems))
    return docs


def target(args: argparse.Namespace) -> tuple[str, str, str]:
    """The kind, name and namespace of the config's RayJob (or RayCluster)."""
    cfg = validate(load_raw(*config_source(args)), "config")
    return ("RayCluster" if args.interactive else "RayJob"), k8s_name(cfg.cluster, cfg.run), cfg.cluster.namespace


def cmd_render(args: argparse.Namespace) -> int:
    text = dump(checked(rendered(args)))
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        problems = check(docs, args.crds)
        for problem in problems:
            print(f"{path}: {problem}")
        failed += bool(problems)
        if not problems:
            print(
                f"{path}: {len(docs)} objects valid"
                + ("" if args.crds else " (KubeRay kinds: lint only; --crds DIR for their schema)")
            )
    return 1 if failed else 0


def cmd_apply(args: argparse.Namespace) -> int:
    from raylm.cluster.kube import apply

    docs = [d for d in yaml.safe_load_all(args.file.read_text()) if d] if args.file else rendered(args)
    for line in apply(checked(docs)):
        print(line)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from raylm.cluster.kube import status

    print("\n".join(status(*target(args))))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from raylm.cluster.kube import logs

    try:
        for text in logs(*target(args), follow=args.follow):
            print(text, end="", flush=True)
    except KeyboardInterrupt:
        print("\n(stopped following; the job goes on)", file=sys.stderr)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from raylm.cluster.kube import delete

    print("\n".join(delete(*target(args))))
    return 0


ACTIONS = [
    Command(
        "render",
        "print the Kubernetes objects that run a config on KubeRay (a RayJob, or --interactive / --platform)",
        render_out_args,
        cmd_render,
    ),
    Command(
        "validate",
        "check manifest files: KubeRay CRD schemas (--crds), core kinds, raylm's lint rules",
        validate_args,
        cmd_validate,
    ),
    Command(
        "apply",
        "render and create the objects on the cluster in your kubeconfig (or --file FILE)",
        apply_args,
        cmd_apply,
    ),
    Command("status", "the RayJob (or --interactive RayCluster) of a config, and its pods", target_args, cmd_status),
    Command(
        "logs", "the job's driver output (the RayJob's submitter pod), or the RayCluster head's", logs_args, cmd_logs
    ),
    Command(
        "delete",
        "delete the config's RayJob (or --interactive RayCluster); the run volume and MLflow stay",
        target_args,
        cmd_delete,
    ),
]


def cluster_args(p: argparse.ArgumentParser) -> None:
    add_commands(p, ACTIONS, "cluster_command", "ACTION")


CLUSTER = Command(
    "cluster",
    "KubeRay manifests for a config: render, validate, apply, status, logs, delete (cluster/README.md)",
    cluster_args,
    None,
)

# --- raylm submit ----------------------------------------------------------------------------


def submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="the job server, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
        "else $RAY_ADDRESS, else http://127.0.0.1:8265)",
    )
    p.add_argument(
        "--working-dir",
        default=".",
        metavar="DIR",
        help="folder copied to the job as its working directory (default: .); .gitignore'd files, "
        ".git, .venv, runs, mlruns and mlflow.db stay behind",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the job (repeatable)",
    )
    p.add_argument(
        "--mlflow-uri", metavar="URI", help="the job's MLFLOW_TRACKING_URI (default: this shell's $MLFLOW_TRACKING_URI)"
    )
    p.add_argument(
        "--num-cpus", type=float, metavar="N", help="CPUs reserved for the job's driver process (Ray's default: 0)"
    )
    p.add_argument(
        "--num-gpus", type=float, metavar="N", help="GPUs reserved for the job's driver process (Ray's default: 0)"
    )
    p.add_argument("--job-id", metavar="ID", help="the submission id (default: Ray picks raysubmit_...)")
    p.add_argument(
        "--no-wait", action="store_true", help="print the job's id and how to follow or stop it, then return"
    )
    submitted_job_args(p)


def submitted_job_args(p: argparse.ArgumentParser) -> None:
    """--stop ID and --follow ID act on a job already submitted; else the command to submit."""
    other = p.add_mutually_exclusive_group()
    other.add_argument(
        "--stop",
        metavar="ID",
        help="stop a submitted job (SIGTERM: raylm checkpoints and exits) and wait for it to end",
    )
    other.add_argument("--follow", metavar="ID", help="stream a submitted job's logs and exit with its status")
    p.add_argument(
        "command", nargs=argparse.REMAINDER, help="after --: what the job runs, e.g. raylm run configs/quickstart.yaml"
    )


def cmd_submit(args: argparse.Namespace) -> int:
    from raylm.cluster import submit as jobs  # Ray's job client only, no torch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.stop or args.follow:
        if command:
            raise ConfigError("submit: --stop and --follow take a job id, not a command")
        return jobs.stop(args.address, args.stop) if args.stop else jobs.follow(args.address, args.follow)
    if not command:
        raise ConfigError("submit: give the command after --, e.g. raylm submit -- raylm run configs/quickstart.yaml")
    cfg = check_raylm_command(command, Path(args.working_dir))
    env = jobs.job_env(args.env, args.mlflow_uri)
    if cfg is not None:
        note_job_local_outputs(cfg, "MLFLOW_TRACKING_URI" in env)
    return jobs.submit(
        args.address, command, args.working_dir, env, args.num_cpus, args.num_gpus, args.job_id, wait=not args.no_wait
    )


def check_raylm_command(command: list[str], working_dir: Path) -> RaylmConfig | None:
    """A `raylm <stage>` command's config validates here, in about a second, rather than on the
    cluster after an upload and a Ray start. Its config file is read from the working dir."""
    if len(command) < 2 or Path(command[0]).name != "raylm" or command[1] not in STAGES:
        return None
    args = parser_for(STAGE_COMMANDS).parse_args(command[1:])
    for attr in ("config", "config_flag"):
        if getattr(args, attr):
            setattr(args, attr, str(working_dir / getattr(args, attr)))
    return resolve_config(args)


def note_job_local_outputs(cfg: RaylmConfig, mlflow_uri_given: bool) -> None:
    """Relative paths resolve in the job's copy of the working dir: Ray garbage-collects those copies
    (its working-dir cache, 10 GB by default) and the cluster's end removes them."""
    what, fixes = [], []
    if not Path(cfg.run.output_dir).is_absolute() and "://" not in cfg.run.output_dir:
        what.append(f"run.output_dir '{cfg.run.output_dir}'")
        fixes.append("set run.output_dir to storage every node shares")
    if not mlflow_uri_given and not cfg.tracking.tracking_uri:
        what.append("the MLflow store ./mlflow.db")
        fixes.append("pass --mlflow-uri")
    if what:
        print(
            f"raylm: note: {' and '.join(what)} will sit in the job's copy of the working dir on the cluster, "
            f"which Ray may delete once the job ends: {' and '.join(fixes)}",
            file=sys.stderr,
        )


SUBMIT = Command(
    "submit",
    "run a command on a Ray cluster as a Ray job: ships the working dir, env vars and MLflow URI, "
    "streams the logs, exits with the job's status",
    submit_args,
    cmd_submit,
    usage="raylm submit [options] -- COMMAND...  |  raylm submit [--address URL] --stop ID  |  "
    "raylm submit [--address URL] --follow ID",
    epilog="example: raylm submit --address http://HEAD:8265 -- raylm run configs/quickstart.yaml "
    "--set run.output_dir=/mnt/shared/runs",
)
