"""Security checks: no code path unpickles a file (a scan of the source), a malicious pickle
named like a checkpoint is refused by every entry point that loads weights, and the local Ray
instance raylm starts listens on loopback only."""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raylm.cli import main
from raylm.errors import DataError
from raylm.models import ModelConfig
from raylm.models.gpt import GPT
from raylm.models.io import load_model, load_weights, save_model
from raylm.pipelines.train.checkpoint import load_checkpoint, save_checkpoint, write_commit
from raylm.pipelines.train.finetune import resolve_base
from raylm.pipelines.train.pretrain import checked_resume
from tests.conftest import REPO

# -- 1. a scan of the source for calls that unpickle ------------------------------------------

ALWAYS_UNSAFE = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.load",
    "_pickle.loads",
    "_pickle.Unpickler",
    "cloudpickle.load",
    "cloudpickle.loads",
    "dill.load",
    "dill.loads",
    "joblib.load",
    "pandas.read_pickle",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "yaml.unsafe_load",
    "yaml.unsafe_load_all",
    "yaml.full_load",
    "yaml.full_load_all",  # FullLoader builds objects
    "torch.serialization._load",
    "torch.serialization._legacy_load",
}
UNPICKLING_MODULES = {"pickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve"}  # `from X import *`
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _keyword(call: ast.Call, name: str, position: int | None = None) -> ast.expr | None:
    """The argument `name` of a call, by keyword or at its position (None: keyword-only)."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return call.args[position] if position is not None and len(call.args) > position else None


def _is_constant(node: ast.expr | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _safe_yaml_loader(node: ast.expr | None) -> bool:
    """yaml.SafeLoader, SafeLoader, or getattr(yaml, "CSafeLoader", yaml.SafeLoader)."""
    if isinstance(node, ast.Attribute):
        return node.attr in SAFE_YAML_LOADERS
    if isinstance(node, ast.Name):
        return node.id in SAFE_YAML_LOADERS
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "getattr"
        and len(node.args) == 3
    ):
        name, default = node.args[1], node.args[2]
        return isinstance(name, ast.Constant) and name.value in SAFE_YAML_LOADERS and _safe_yaml_loader(default)
    return False


# Loaders that are safe only with the right argument: torch.load(weights_only=True) (an allow-list
# unpickler), numpy.load without allow_pickle, yaml.load with a safe Loader.
CONDITIONAL = {
    "torch.load": lambda call: _is_constant(_keyword(call, "weights_only"), True),
    "torch.serialization.load": lambda call: _is_constant(_keyword(call, "weights_only"), True),
    "numpy.load": lambda call: (
        _keyword(call, "allow_pickle", 2) is None or _is_constant(_keyword(call, "allow_pickle", 2), False)
    ),
    "yaml.load": lambda call: _safe_yaml_loader(_keyword(call, "Loader", 1)),
    "yaml.load_all": lambda call: _safe_yaml_loader(_keyword(call, "Loader", 1)),
}


def _aliases(tree: ast.Module) -> dict[str, set[str]]:
    """Local name -> the dotted names it is bound to by any import in the file (function-level
    imports included: raylm imports heavy modules lazily)."""
    names: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                local, target = (a.asname, a.name) if a.asname else (a.name.split(".")[0], a.name.split(".")[0])
                names.setdefault(local, set()).add(target)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names.setdefault(a.asname or a.name, set()).add(f"{node.module}.{a.name}")
    return names


def _dotted(node: ast.expr, aliases: dict[str, set[str]]) -> set[str]:
    """The dotted names an expression like `p.loads` or `torch.serialization.load` may denote."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, set())
    if isinstance(node, ast.Attribute):
        return {f"{base}.{node.attr}" for base in _dotted(node.value, aliases)}
    return set()


def unpickling_calls(source: str, filename: str = "<string>") -> list[str]:
    """'file:line: what' for each use of a loader that can run code from the data it reads."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    safe_calls = {
        id(node.func)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and any(name in CONDITIONAL and CONDITIONAL[name](node) for name in _dotted(node.func, aliases))
    }
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module in UNPICKLING_MODULES
            and any(a.name == "*" for a in node.names)
        ):
            found.append(f"{filename}:{node.lineno}: from {node.module} import *")
        if not isinstance(node, (ast.Name, ast.Attribute)) or id(node) in safe_calls:
            continue
        for name in sorted(_dotted(node, aliases) & (ALWAYS_UNSAFE | CONDITIONAL.keys())):
            found.append(f"{filename}:{node.lineno}: {name}")
    return found


def repo_sources() -> list[Path]:
    """Every .py file of the repository, tests included; not .venv, .git or build metadata."""
    return sorted(
        p
        for p in REPO.rglob("*.py")
        if not any(part.startswith(".") or part.endswith(".egg-info") for part in p.relative_to(REPO).parts)
    )


SELF_TEST = """\
import pickle as p
from pickle import loads
from cloudpickle import loads as cl
import torch, numpy as np, yaml, dill, joblib, marshal, shelve, pandas as pd
from torch.serialization import load as tsl
from yaml import Loader, SafeLoader
p.load(f)
loads(b)
cl(b)
class U(p.Unpickler): pass
torch.load(f)
torch.load(f, weights_only=False)
tsl(f)
np.load(f, allow_pickle=True)
pd.read_pickle(f)
yaml.load(s)
yaml.load(s, Loader=yaml.Loader)
yaml.load(s, Loader=yaml.UnsafeLoader)
yaml.load(s, Loader=yaml.FullLoader)
yaml.unsafe_load(s)
dill.loads(b)
joblib.load(f)
marshal.loads(b)
shelve.open(f)
x = torch.load
torch.load(f, weights_only=True)
np.load(f)
yaml.load(s, Loader=yaml.SafeLoader)
yaml.load(s, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
yaml.safe_load(s)
pickle.dumps(b)
from dill import *
"""
SELF_TEST_UNSAFE_LINES = [*range(7, 26), 32]  # lines 7-25 and 32 can unpickle; 26-31 are safe


def test_the_scanner_catches_each_unpickling_pattern():
    found = unpickling_calls(SELF_TEST, "selftest.py")
    lines = sorted({int(f.split(":")[1]) for f in found})
    assert lines == SELF_TEST_UNSAFE_LINES, "\n".join(found)
    print(
        f"[test] the scanner flagged all {len(lines)} unpickling lines of the sample, aliases included, "
        "and none of its safe ones"
    )


def test_no_code_unpickles():
    files = repo_sources()
    assert REPO / "models" / "io.py" in files and len(files) > 50  # the walk found the code
    found = [f for path in files for f in unpickling_calls(path.read_text(), str(path.relative_to(REPO)))]
    assert not found, "code that can unpickle a file:\n" + "\n".join(found)
    print(
        f"[test] scanned {len(files)} .py files: "
        "no pickle/torch.load/numpy allow_pickle/unsafe yaml/marshal/shelve loads"
    )


# -- 2. a malicious pickle named like a checkpoint --------------------------------------------


class TouchOnUnpickle:
    """Unpickling this calls Path(marker).touch(): the marker file proves that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return self.marker.touch, ()


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    """A raw pickle and a torch.save zip, each creating a marker file when unpickled, shown to
    work on a plain unpickler (in a subprocess: the repository's code must not hold one, not
    even this test). Returns the payloads and their markers."""
    tmp = tmp_path_factory.mktemp("payloads")
    markers = {kind: tmp / f"PWNED-{kind}" for kind in ("pickle", "torch")}
    files = {"pickle": tmp / "evil.pkl", "torch": tmp / "evil.pt"}
    files["pickle"].write_bytes(pickle.dumps(TouchOnUnpickle(markers["pickle"])))
    torch.save(TouchOnUnpickle(markers["torch"]), files["torch"])
    unpickle = (
        "import pickle, sys, torch; pickle.loads(open(sys.argv[1], 'rb').read()); "
        "torch.load(sys.argv[2], weights_only=False)"
    )
    subprocess.run([sys.executable, "-c", unpickle, str(files["pickle"]), str(files["torch"])], check=True)
    assert all(m.exists() for m in markers.values()), "the payloads are not live"
    for m in markers.values():
        m.unlink()
    return {kind: f.read_bytes() for kind, f in files.items()}, list(markers.values())


@pytest.fixture
def malice(payloads):
    """The payloads by kind; after the test, no marker may exist."""
    data, markers = payloads
    yield data
    assert not [m for m in markers if m.exists()], "raylm unpickled a payload"


TINY = ModelConfig(vocab_size=32, n_layer=1, n_head=2, n_embd=16, block_size=16)
HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 16,
}


SHARD = f"state/shard-00001-model-00001-of-{TINY.n_layer + 1:05d}.safetensors"  # one rank's first block


def checkpoint_with(tmp: Path, name: str, payload: bytes, file: str) -> Path:
    """A whole training checkpoint (valid model.json, tokenizer.json, COMMIT.json written after
    the swap, as an attacker would) whose `file` holds `payload`."""
    model = GPT(TINY)
    (tmp / "tokenizer.json").write_text("{}")  # refused before any tokenizer is read
    directory = tmp / name / "checkpoint_000001"
    save_checkpoint(directory, model, torch.optim.AdamW(model.parameters()), {"step": 1}, tmp / "tokenizer.json")
    (directory / file).write_bytes(payload)
    write_commit(directory)
    return directory


def hf_dir_with(tmp: Path, name: str, files: dict[str, bytes]) -> Path:
    directory = tmp / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    (directory / "tokenizer.json").write_text("{}")
    for file, payload in files.items():
        (directory / file).write_bytes(payload)
    return directory


def refused_by_cli(argv: list[str], capsys, *names: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err and err.startswith("raylm: error:"), err
    assert all(name in err for name in names), err
    return err


@pytest.mark.parametrize("kind", ["pickle", "torch"])
def test_generate_and_evaluate_refuse_a_pickled_checkpoint(tmp_path, malice, capsys, kind):
    ckpt = checkpoint_with(tmp_path, "run", malice[kind], SHARD)
    path = str(ckpt / SHARD)
    refused_by_cli(["generate", "--checkpoint", str(ckpt)], capsys, path, "not a safetensors file")
    err = refused_by_cli(["evaluate", "--checkpoint", str(ckpt), "--set", f"run.output_dir={tmp_path}"], capsys, path)
    print(f"[test] a {kind} payload as a checkpoint shard: generate and evaluate exit 2 with {err!r}")


def test_weight_loaders_refuse_a_pickled_checkpoint(tmp_path, malice):
    ckpt = checkpoint_with(tmp_path, "run", malice["pickle"], SHARD)
    model = GPT(TINY)
    for load in (
        lambda: load_weights(GPT(TINY), ckpt),
        lambda: load_model(ckpt),
        lambda: load_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters())),
        lambda: checked_resume(ckpt, TINY),
        lambda: resolve_base(str(ckpt), tmp_path / "out"),
    ):
        with pytest.raises(DataError, match=f"{ckpt / SHARD} is not a safetensors file"):
            load()
    print(
        "[test] a pickle as a checkpoint shard: load_weights, load_model, load_checkpoint, checked_resume "
        "(--resume) and resolve_base (finetune.base) raise DataError naming it"
    )


def test_a_pickled_model_directory_is_refused(tmp_path, malice):
    directory = tmp_path / "model"
    save_model(GPT(TINY), directory)
    (directory / "model.safetensors").write_bytes(malice["torch"])
    for load in (lambda: load_weights(GPT(TINY), directory), lambda: load_model(directory)):
        with pytest.raises(DataError, match=f"{directory / 'model.safetensors'} is not a safetensors file"):
            load()


def test_loading_a_sharded_checkpoint_never_unpickles(tmp_path, monkeypatch):
    """torch.distributed.checkpoint's Hugging Face reader builds its metadata from safetensors
    headers and JSON; its base class's .metadata file is a pickle. With every unpickling entry
    point made to raise, a checkpoint still resumes and loads as a model."""
    model = GPT(TINY)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    (tmp_path / "tokenizer.json").write_text("{}")
    ckpt = tmp_path / "checkpoint_000001"
    save_checkpoint(ckpt, model, optimizer, {"step": 1}, tmp_path / "tokenizer.json")

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    again = GPT(TINY)
    assert load_checkpoint(ckpt, again, torch.optim.AdamW(again.parameters()))["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), load_model(ckpt).state_dict().values()))


def test_a_checkpoint_of_the_whole_state_layout_is_refused_for_resume(tmp_path):
    """Before sharded saves a checkpoint held model.safetensors and train_state.safetensors:
    its weights still load, resuming from it says why not."""
    ckpt = tmp_path / "checkpoint_000001"
    save_model(GPT(TINY), ckpt)
    (ckpt / "tokenizer.json").write_text("{}")
    write_commit(ckpt)
    load_model(ckpt)
    model = GPT(TINY)
    for load in (
        lambda: load_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters())),
        lambda: checked_resume(ckpt, TINY),
    ):
        with pytest.raises(DataError, match="whole-state checkpoint of an earlier raylm"):
            load()


def test_a_hugging_face_directory_of_pickles_is_refused(tmp_path, malice, capsys):
    pickles = hf_dir_with(tmp_path, "hf-bin", {"pytorch_model.bin": malice["torch"], "model.pt": malice["pickle"]})
    disguised = hf_dir_with(tmp_path, "hf-disguised", {"model.safetensors": malice["torch"]})
    refused_by_cli(["import-hf", str(pickles), "--out", str(tmp_path / "a")], capsys, "model.pt", "pytorch_model.bin")
    err = refused_by_cli(
        ["import-hf", str(disguised), "--out", str(tmp_path / "b")],
        capsys,
        str(disguised / "model.safetensors"),
        "not a safetensors file",
    )
    with pytest.raises(DataError, match="never unpickles model.pt, pytorch_model.bin"):
        resolve_base(str(pickles), tmp_path / "out")
    with pytest.raises(DataError, match=f"{disguised / 'model.safetensors'} is not a safetensors file"):
        resolve_base(str(disguised), tmp_path / "out")
    print(
        f"[test] HF dirs with pytorch_model.bin + model.pt, or a torch zip as model.safetensors: import-hf exits 2 "
        f"({err!r}); finetune.base raises DataError"
    )


# -- 3. the local Ray instance listens on loopback only ---------------------------------------

RAY_START_S = 120  # start_ray took 5-11 s on 2 cores, more beside a second instance; then up to 30 s for its agents


def listening_sockets(pids: set[int]) -> list[dict]:
    import psutil  # ships inside Ray (ray/thirdparty_files), on sys.path once ray is imported

    return [
        {"pid": c.pid, "process": _name(c.pid), "ip": c.laddr.ip, "port": c.laddr.port}
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]


def _name(pid: int) -> str:
    import psutil

    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "?"


def report_ray_sockets() -> None:
    """Run in a fresh process: start Ray as raylm does, wait until every port the instance
    reports (GCS, raylet, object manager, agents, metrics) listens, and print the LISTEN
    sockets of this process and its descendants (every process of a local instance) as JSON."""
    import psutil  # after ray: see listening_sockets
    import ray

    from raylm.pipelines.runtime import start_ray

    start_ray()
    ray.get(ray.remote(lambda: None).remote())  # a worker process and its gRPC server exist
    node = ray.nodes()[0]
    # -1: a port Ray could not bind (52365 is a fixed default, taken when another instance runs)
    reported = {v for k, v in node.items() if k.endswith("Port") and v > 0}
    reported.add(int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]))
    deadline = time.monotonic() + 30  # the dashboard and runtime-env agents start after init returns
    while True:
        me = psutil.Process()
        sockets = listening_sockets({me.pid} | {p.pid for p in me.children(recursive=True)})
        if reported <= {s["port"] for s in sockets} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print("SOCKETS " + json.dumps({"reported": sorted(reported), "sockets": sockets}), flush=True)
    ray.shutdown()


def is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host.split("%")[0])
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_local_ray_listens_on_loopback_only():
    # Not covered here: during multi-worker training torch's TCPStore (the process-group
    # rendezvous on rank 0) listens on every interface whatever MASTER_ADDR is; torch has no
    # setting for its bind address (pytorch/pytorch#173909). Its gloo pairs bind 127.0.0.1.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local instance, not the suite's
    proc = subprocess.run(
        [sys.executable, "-c", "from tests.test_security import report_ray_sockets as r; r()"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=RAY_START_S,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("SOCKETS ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    report = json.loads(line.removeprefix("SOCKETS "))
    sockets = report["sockets"]
    assert set(report["reported"]) <= {s["port"] for s in sockets}, report  # every service Ray names was seen
    exposed = [s for s in sockets if not is_loopback(s["ip"])]
    assert not exposed, f"Ray listens beyond loopback: {exposed}"
    names = sorted({s["process"] for s in sockets})
    print(
        f"[test] start_ray(): {len(sockets)} LISTEN sockets of {len(names)} Ray processes "
        f"({', '.join(names)}), all on loopback"
    )
