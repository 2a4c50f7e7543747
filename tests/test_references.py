"""Every reference in the tree's prose resolves from a clone: comments and docstrings cite a file
in the repository, a commit or a paper, never a tracker's issue number or a document that was
never committed (a planning note, a style guide kept elsewhere).

Prose is what is scanned: Python comments and docstrings, the comments of YAML, TOML, shell
and Dockerfiles, and Markdown whole. String literals in code are data, and are left alone."""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO

UNRESOLVABLE = {
    "an issue number": re.compile(r"\bissues? #?\d+\b|\bPR #?\d+\b|(?<![\w&#/-])\(?#\d+\b(?![\w-])", re.IGNORECASE),
    "a document not in the repository": re.compile(
        r"(?-i:\bBRIEF\b)|\bthe brief\b|\bSTYLE\.md\b|\bRAY-NOTES\b|\bthe card\b", re.IGNORECASE
    ),
}
COMMENTED = {".yaml", ".yml", ".toml", ".cfg", ".ini", ".sh"}  # prose is the text after a `#`


@cache
def tree_files() -> list[Path]:
    """Tracked files and new ones git does not ignore (no .venv, no run outputs)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    return sorted({REPO / name for name in listed.split("\0") if name and (REPO / name).is_file()})


def python_prose(text: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file."""
    out = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    out += [(body[0].lineno + i, line) for i, line in enumerate(body[0].value.value.splitlines())]
    return out


@cache
def prose(path: Path) -> list[tuple[int, str]] | None:
    """The prose of a file, by line; None for a kind of file that holds none (data, images)."""
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError):
        return None
    if path.suffix == ".py":
        return python_prose(text)
    if path.suffix == ".md":
        return list(enumerate(text.splitlines(), 1))
    if (
        path.suffix in COMMENTED
        or path.name.startswith("Dockerfile")
        or path.name == ".dockerignore"
        or (not path.suffix and text.startswith("#!"))
    ):
        return [
            (n, m.group(1)) for n, line in enumerate(text.splitlines(), 1) if (m := re.search(r"(?:^|\s)#(.*)", line))
        ]
    return None


def test_the_scan_reads_the_kinds_of_file_that_hold_prose():
    kinds = {p.suffix or p.name for p in tree_files() if p.resolve() != Path(__file__).resolve() and prose(p)}
    assert {".py", ".yaml", ".toml", ".md", "Dockerfile"} <= kinds, kinds


def test_comments_and_docstrings_cite_only_what_a_clone_has():
    found = []
    for path in tree_files():
        if path.resolve() == Path(__file__).resolve():
            continue  # its patterns would match themselves
        for number, line in prose(path) or []:
            for what, pattern in UNRESOLVABLE.items():
                if match := pattern.search(line):
                    found.append(f"  {path.relative_to(REPO)}:{number}: {match.group(0)!r} is {what}: {line.strip()}")
    assert not found, (
        "references a reader of a clone cannot follow:\n"
        + "\n".join(found)
        + "\nFix: cite the file in the repository that says it, the commit (git log --oneline) "
        "or the paper; or drop the citation if the sentence stands on its own"
    )


@pytest.mark.parametrize(
    "line",
    ["see issue 7", "(issue 12)", "fixed in #12.", "issues #3 and #4", "the BRIEF, sec. 4", "docs/STYLE.md"],
)
def test_the_patterns_catch_each_form(line):
    assert any(p.search(line) for p in UNRESOLVABLE.values())


@pytest.mark.parametrize(
    "line", ["# 8 workers", "color #ffffff", "step 12", "a brief pause", "&#39;", "issue a warning", "chart card"]
)
def test_the_patterns_leave_ordinary_prose_alone(line):
    assert not any(p.search(line) for p in UNRESOLVABLE.values())
