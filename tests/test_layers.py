"""Layering, checked on the source: which parts of raylm may import which (pipelines/__init__.py
draws the arrows), no import cycles, and no private names taken across modules.

Every .py under raylm/ (its symlinks not followed), models/, pipelines/, tuning/ and cluster/ is
parsed; every import counts, at any depth (inside functions, where raylm imports heavy modules,
and under TYPE_CHECKING: a type couples two modules as much as a call does), and
`from raylm.a import b` where b is a module counts as an import of raylm.a.b. A file's module
name is the one Python gives it: models/io.py is raylm.models.io.

The parts:
  spine      raylm/*.py but the CLI and __main__.py: config, errors, fmt (and raylm/__init__.py)
  cli        raylm/cli/, and raylm/__main__.py
  models     models/          imports the spine and itself
  pipelines  pipelines/       never tuning, cluster or the CLI; inside it, one way:
             runtime.py  <- every stage; imports only the spine
             track/      a leaf every stage may use: the spine, models, runtime
             data/       the spine, models, runtime
             eval/       + data, track
             train/      + data, eval, track
             jobs.py     + train: it composes the stages
  tuning, cluster        anything, as long as no cycle forms
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tests.conftest import REPO

LINKED = ("models", "pipelines", "tuning", "cluster")  # top-level folders raylm/ links to

# What each pipelines stage may import of pipelines and models, besides itself and the spine.
STAGE_MAY_IMPORT = {
    "pipelines": set(),  # the package's __init__.py: a docstring
    "runtime": set(),
    "track": {"models", "runtime"},
    "data": {"models", "runtime"},
    "eval": {"models", "runtime", "data", "track"},
    "train": {"models", "runtime", "data", "eval", "track"},
    "jobs": {"models", "runtime", "data", "eval", "train", "track"},
}

# Imports that break a rule while a change in flight removes them, each with that change:
# (importer, imported module or package) -> why it is allowed for now. Each rule's test leaves
# them out; test_pending_imports_are_still_there fails once one is gone, so that its entry is
# deleted and the rule covers it again. Empty: every rule holds for the whole tree.
PENDING: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the raylm module it imports
    name: str | None  # the name `from target import name` takes; None: the module itself
    named: str  # the module as the source names it: "raylm.models", "models", ".loader"
    statement: str  # the whole import statement, for messages
    where: str  # file:line
    local: str | None = None  # the name it binds to a module, if it binds one (`import raylm.x` binds raylm)

    def __str__(self) -> str:
        return f"{self.where}: {self.statement}"


def module_name(path: Path) -> str:
    """raylm/config.py -> raylm.config; models/io.py -> raylm.models.io; x/__init__.py -> raylm.x."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts if parts[0] == "raylm" else ["raylm", *parts])


def source_files() -> dict[str, Path]:
    """Module name -> file, for every file of raylm (raylm/'s symlinks not followed: the
    folders they point to are walked under their own names)."""
    files = {}
    for top in ("raylm", *LINKED):
        for folder, dirs, names in os.walk(REPO / top, followlinks=False):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(names):
                if name.endswith(".py"):
                    path = Path(folder) / name
                    files[module_name(path)] = path
    return files


def part(module: str) -> str:
    """spine, cli, models, pipelines, tuning or cluster."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LINKED:
        return parts[1]
    if len(parts) > 1 and parts[1] in ("cli", "__main__"):
        return "cli"
    return "spine"


def stage(module: str) -> str:
    """For a pipelines module: data, train, eval, track, runtime, jobs, or pipelines (the package)."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else "pipelines"


def imports_of(tree: ast.Module, source: str, is_package: bool, modules: set[str], file: str) -> Iterator[Import]:
    """The raylm modules a parsed file imports, at any depth."""

    def known(dotted: str) -> str:
        # the longest prefix that is a module: `import raylm.models.io.x` can only mean a module
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
        return dotted

    def ours(dotted: str) -> str | None:
        # models.io, spelled without raylm., is still raylm.models.io (test_imports_name_raylm)
        head = dotted.split(".")[0]
        return dotted if head == "raylm" else f"raylm.{dotted}" if head in LINKED else None

    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom, ast.Call)):
            continue
        at = (ast.unparse(node), f"{file}:{node.lineno}")
        if isinstance(node, ast.Import):
            for alias in node.names:
                if dotted := ours(alias.name):
                    yield Import(source, known(dotted), None, alias.name, *at, alias.asname)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importing module's package upwards
                package = source.split(".") if is_package else source.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = ours(node.module or "")
            if not base:
                continue
            named = "." * node.level + (node.module or "")
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    yield Import(source, f"{base}.{alias.name}", None, named, *at, alias.asname or alias.name)
                else:
                    yield Import(source, known(base), alias.name, named, *at)
        elif (
            isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (dotted := ours(node.args[0].value))
        ):
            yield Import(source, known(dotted), None, node.args[0].value, *at)


def private_attributes(tree: ast.Module, aliases: dict[str, str]) -> Iterator[tuple[str, str, int]]:
    """(module, _name, line) for `mod._name` where `mod` is bound to a raylm module by an import."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and is_private(node.attr)
        ):
            yield aliases[node.value.id], node.attr, node.lineno


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass
class Scan:
    files: dict[str, Path]
    imports: list[Import]
    private_uses: list[str]  # "file:line: module._name"


@cache
def scan() -> Scan:
    files = source_files()
    modules = set(files)
    imports, private_uses = [], []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = str(path.relative_to(REPO))
        found = list(imports_of(tree, module, path.name == "__init__.py", modules, rel))
        imports += found
        aliases = {i.local: i.target for i in found if i.local}
        private_uses += [f"{rel}:{line}: {mod}.{attr}" for mod, attr, line in private_attributes(tree, aliases)]
    return Scan(files, imports, private_uses)


def pending(imp: Import) -> bool:
    return any(imp.source == src and (imp.target == dst or imp.target.startswith(dst + ".")) for src, dst in PENDING)


def edges() -> list[Import]:
    """Every import between two raylm modules, the pending ones left out."""
    return [i for i in scan().imports if i.target != i.source and not pending(i)]


def report(broken: list[Import], rule: str, fix: str = "") -> str:
    """The rule, each offending statement once (file:line order), and how to fix it."""

    def order(where: str) -> tuple[str, int]:
        file, line = where.rsplit(":", 1)
        return file, int(line)

    lines = sorted({(i.where, i.statement) for i in broken}, key=lambda w: order(w[0]))
    text = f"{rule}:\n" + "\n".join(f"  {where}: {statement}" for where, statement in lines)
    return text + (f"\nFix: {fix}" if fix else "")


# -- the scanner sees what it must --------------------------------------------------------------


def test_the_scan_covers_every_part_and_imports_inside_functions():
    s = scan()
    for module in ("raylm.config", "raylm.models.io", "raylm.pipelines.jobs", "raylm.tuning.sweep", "raylm.cluster"):
        assert module in s.files, f"{module} not scanned: has the layout moved? update source_files()"
    assert not any(".models.models" in m or "raylm.raylm" in m for m in s.files), "a symlink was followed"
    pairs = {(i.source, i.target) for i in s.imports}
    assert ("raylm.pipelines.jobs", "raylm.pipelines.train.pretrain") in pairs  # module level
    assert ("raylm.pipelines.jobs", "raylm.pipelines.eval.lm_eval_adapter") in pairs  # inside a function


def test_the_scanner_resolves_submodules_relative_imports_and_top_level_names():
    modules = {"raylm", "raylm.a", "raylm.a.b", "raylm.models", "raylm.models.io", "raylm.x", "raylm.x.y"}
    code = (
        "from raylm.a import b, c\n"
        "def f():\n"
        "    import raylm.models.io as io\n"
        "    from models.io import load\n"
        "from . import y\n"
        "from .. import a\n"
        "import importlib\n"
        "importlib.import_module('raylm.a.b')\n"
    )
    found = [(i.target, i.name) for i in imports_of(ast.parse(code), "raylm.x.z", False, modules, "z.py")]
    assert found == [
        ("raylm.a.b", None),
        ("raylm.a", "c"),
        ("raylm.x.y", None),
        ("raylm.a", None),
        ("raylm.models.io", None),
        ("raylm.models.io", "load"),
        ("raylm.a.b", None),
    ]


# -- which part may import which ---------------------------------------------------------------


def test_imports_name_raylm():
    """`from models.io import x` works only from the repository root (the folder is not a
    package of the wheel) and loads a second copy of the module beside raylm.models.io."""
    broken = [i for i in scan().imports if i.named.split(".")[0] in LINKED]
    assert not broken, report(
        broken,
        "imports that name a linked folder without raylm.",
        "spell them through raylm: `from raylm.models.io import x`",
    )


def test_spine_imports_only_the_spine():
    broken = [i for i in edges() if part(i.source) == "spine" and part(i.target) != "spine"]
    assert not broken, report(
        broken,
        "the spine (raylm/config.py, errors.py, fmt.py) imports nothing of raylm but itself",
        "move what the spine needs into the spine, or the code that needs it out of the spine",
    )


def test_models_import_only_the_spine_and_themselves():
    broken = [i for i in edges() if part(i.source) == "models" and part(i.target) not in ("spine", "models")]
    assert not broken, report(
        broken,
        "models/ imports only the spine and models/",
        "the caller should pass what the model needs in (models/ is plain PyTorch, reusable alone)",
    )


def test_pipelines_do_not_import_tuning_cluster_or_the_cli():
    broken = [i for i in edges() if part(i.source) == "pipelines" and part(i.target) in ("tuning", "cluster", "cli")]
    assert not broken, report(
        broken,
        "pipelines/ imports tuning, cluster or the CLI, which sit above it",
        "move the shared piece down into pipelines/ (or the spine) and import it from both",
    )


def test_pipeline_stages_point_one_way():
    """data <- eval <- train <- jobs; track a leaf every stage may use; runtime spine-only."""
    broken = []
    for i in edges():
        if part(i.source) != "pipelines" or part(i.target) not in ("pipelines", "models"):
            continue
        theirs = "models" if part(i.target) == "models" else stage(i.target)
        if theirs != stage(i.source) and theirs not in STAGE_MAY_IMPORT[stage(i.source)]:
            broken.append(i)
    allowed = "; ".join(f"{k}: {', '.join(sorted(v)) or 'the spine only'}" for k, v in STAGE_MAY_IMPORT.items())
    assert not broken, report(
        broken,
        f"a pipelines stage imports a stage above it (allowed, besides itself and the spine: {allowed})",
        "move the shared piece down to the lower stage (or the spine) that both may import; for an "
        "import only a type needs, let the lower stage take plain values or a Protocol of its own",
    )


# -- cycles and private names ------------------------------------------------------------------


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_no_import_cycles():
    """Function-level imports count too: they hide a cycle from Python, not from a reader."""
    graph: dict[str, set[str]] = {}
    for i in edges():
        graph.setdefault(i.source, set()).add(i.target)
    found = cycles(graph)
    messages = []
    for component in found:
        members = set(component)
        inside = [i for i in edges() if i.source in members and i.target in members]
        messages.append(report(inside, f"cycle among {', '.join(component)}"))
    assert not found, "\n".join(messages) + (
        "\nFix: make the arrow one-way: move the piece both sides need into a module that "
        "imports neither (often the lower layer), or pass it in as an argument"
    )


def test_no_private_names_across_modules():
    s = scan()
    broken = sorted({str(i) for i in s.imports if i.name and is_private(i.name) and i.target != i.source})
    broken += s.private_uses
    assert not broken, (
        "a module takes a private (_name) from another module:\n"
        + "\n".join(f"  {b}" for b in sorted(broken))
        + "\nFix: make it public where it is defined (drop the underscore, give it a docstring), "
        "or move it to the one module that uses it"
    )


# -- the exceptions in flight ------------------------------------------------------------------


def test_pending_imports_are_still_there():
    """A PENDING entry whose import is gone must go too, or it would hide the import's return."""
    gone = [
        f"  {src} -> {dst} ({why})"
        for (src, dst), why in PENDING.items()
        if not any(i.source == src and (i.target == dst or i.target.startswith(dst + ".")) for i in scan().imports)
    ]
    assert not gone, "no longer imported, so delete from PENDING:\n" + "\n".join(gone)
