"""`raylm cluster render|validate|apply|status|logs|delete` and `raylm submit`: argument parsing and output.
Rendering needs only the config; the Kubernetes client is imported by the commands that talk
to a cluster (cluster/kube.py)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import yaml

from cluster.manifests import dump, k8s_name
from cluster.render import JOB_COMMANDS, render_cluster, render_job, render_platform
from cluster.validate import check
from raylm.config import RaylmConfig, load_raw, validate
from raylm.errors import ConfigError

HELP = {
    "render": "print the Kubernetes objects that run a config on KubeRay (a RayJob, or --interactive / --platform)",
    "validate": "check manifest files: KubeRay CRD schemas (--crds), core kinds, raylm's lint rules",
    "apply": "render and create the objects on the cluster in your kubeconfig (or --file FILE)",
    "status": "the RayJob (or --interactive RayCluster) of a config, and its pods",
    "logs": "the job's driver output (the RayJob's submitter pod), or the RayCluster head's",
    "delete": "delete the config's RayJob (or --interactive RayCluster); the run volume and MLflow stay",
}


def add_cluster_commands(parser: argparse.ArgumentParser, config_args) -> None:
    sub = parser.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    for name in HELP:
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        if name == "validate":
            p.add_argument("files", nargs="+", type=Path, help="YAML manifests (several objects per file are fine)")
            p.add_argument(
                "--crds", type=Path, metavar="DIR", help="folder with the KubeRay CRDs (ray.io_rayjobs.yaml, ...)"
            )
            p.set_defaults(func=cmd_validate)
            continue
        config_args(p)
        p.add_argument("--interactive", action="store_true", help="a long-lived RayCluster instead of a RayJob")
        if name in ("render", "apply"):
            p.add_argument(
                "--job", default="run", choices=JOB_COMMANDS, help="the raylm command the RayJob runs (default run)"
            )
            p.add_argument("--space", type=Path, metavar="YAML", help="the sweep file, with --job tune")
            p.add_argument(
                "--platform",
                action="store_true",
                help="the namespace's shared objects instead: run volume, MLflow server, NetworkPolicy",
            )
        if name == "render":
            p.add_argument("--out", type=Path, metavar="FILE", help="write to FILE instead of stdout")
        if name == "apply":
            p.add_argument("--file", type=Path, metavar="FILE", help="apply this manifest file instead of rendering")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="keep streaming until the pod ends")
        p.set_defaults(func=globals()[f"cmd_{name}"])


def rendered(args: argparse.Namespace) -> list[dict]:
    from raylm.cli import config_source

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
    from cluster.kube import apply

    docs = [d for d in yaml.safe_load_all(args.file.read_text()) if d] if args.file else rendered(args)
    for line in apply(checked(docs)):
        print(line)
    return 0


def target(args: argparse.Namespace) -> tuple[str, str, str]:
    from raylm.cli import config_source

    cfg = validate(load_raw(*config_source(args)), "config")
    return ("RayCluster" if args.interactive else "RayJob"), k8s_name(cfg.cluster, cfg.run), cfg.cluster.namespace


def cmd_status(args: argparse.Namespace) -> int:
    from cluster.kube import status

    print("\n".join(status(*target(args))))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from cluster.kube import logs

    try:
        for text in logs(*target(args), follow=args.follow):
            print(text, end="", flush=True)
    except KeyboardInterrupt:
        print("\n(stopped following; the job goes on)", file=sys.stderr)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from cluster.kube import delete

    print("\n".join(delete(*target(args))))
    return 0


SUBMIT_HELP = (
    "run a command on a Ray cluster as a Ray job: ships the working dir, env vars and MLflow URI, "
    "streams the logs, exits with the job's status"
)


def add_submit_command(sub) -> None:
    s = sub.add_parser(
        "submit",
        help=SUBMIT_HELP,
        description=SUBMIT_HELP,
        usage="raylm submit [options] -- COMMAND...  |  raylm submit [--address URL] --stop ID  |  "
        "raylm submit [--address URL] --follow ID",
        epilog="example: raylm submit --address http://HEAD:8265 -- raylm run configs/quickstart.yaml "
        "--set run.output_dir=/mnt/shared/runs",
    )
    s.add_argument(
        "--address",
        help="the job server, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
        "else $RAY_ADDRESS, else http://127.0.0.1:8265)",
    )
    s.add_argument(
        "--working-dir",
        default=".",
        metavar="DIR",
        help="folder copied to the job as its working directory (default: .); .gitignore'd files, "
        ".git, .venv, runs, mlruns and mlflow.db stay behind",
    )
    s.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the job (repeatable)",
    )
    s.add_argument(
        "--mlflow-uri", metavar="URI", help="the job's MLFLOW_TRACKING_URI (default: this shell's $MLFLOW_TRACKING_URI)"
    )
    s.add_argument(
        "--num-cpus", type=float, metavar="N", help="CPUs reserved for the job's driver process (Ray's default: 0)"
    )
    s.add_argument(
        "--num-gpus", type=float, metavar="N", help="GPUs reserved for the job's driver process (Ray's default: 0)"
    )
    s.add_argument("--job-id", metavar="ID", help="the submission id (default: Ray picks raysubmit_...)")
    s.add_argument(
        "--no-wait", action="store_true", help="print the job's id and how to follow or stop it, then return"
    )
    other = s.add_mutually_exclusive_group()
    other.add_argument(
        "--stop",
        metavar="ID",
        help="stop a submitted job (SIGTERM: raylm checkpoints and exits) and wait for it to end",
    )
    other.add_argument("--follow", metavar="ID", help="stream a submitted job's logs and exit with its status")
    s.add_argument(
        "command", nargs=argparse.REMAINDER, help="after --: what the job runs, e.g. raylm run configs/quickstart.yaml"
    )
    s.set_defaults(func=cmd_submit)


def cmd_submit(args: argparse.Namespace) -> int:
    from raylm.cluster import submit as jobs  # Ray's job client only, no torch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.stop or args.follow:
        if command:
            raise ConfigError("submit: --stop and --follow take a job id, not a command")
        return jobs.stop(args.address, args.stop) if args.stop else jobs.follow(args.address, args.follow)
    if not command:
        raise ConfigError("submit: give the command after --, e.g. raylm submit -- raylm run configs/quickstart.yaml")
    cfg = _check_raylm_command(command, Path(args.working_dir))
    env = jobs.job_env(args.env, args.mlflow_uri)
    if cfg is not None:
        _note_job_local_outputs(cfg, "MLFLOW_TRACKING_URI" in env)
    return jobs.submit(
        args.address, command, args.working_dir, env, args.num_cpus, args.num_gpus, args.job_id, wait=not args.no_wait
    )


def _check_raylm_command(command: list[str], working_dir: Path) -> RaylmConfig | None:
    """A `raylm <stage>` command's config validates here, in about a second, rather than on the
    cluster after an upload and a Ray start. Its config file is read from the working dir."""
    from raylm.cli import STAGES, build_parser, resolve_config

    if len(command) < 2 or Path(command[0]).name != "raylm" or command[1] not in STAGES:
        return None
    args = build_parser().parse_args(command[1:])
    for attr in ("config", "config_flag"):
        if getattr(args, attr):
            setattr(args, attr, str(working_dir / getattr(args, attr)))
    return resolve_config(args)


def _note_job_local_outputs(cfg: RaylmConfig, mlflow_uri_given: bool) -> None:
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
