"""Raw files -> documents. Every problem with the input becomes a row with a reason, the file
and the line, so it is counted (and, in strict mode, reported by prepare); nothing is dropped
silently.

A document row: source, path, line (1-based line, or row for Parquet, where it starts),
text, reason ("" while it is kept), snippet (the start of a rejected document) and
raw_bytes (its size as read). Plain Python: Ray Data calls `documents_of_file` per file.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import re
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from raylm.errors import DataError

TEXT_SUFFIXES = {".txt", ".md", ".text"}
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
PARQUET_SUFFIXES = {".parquet"}
COMPRESSION = {".gz": "gzip", ".zst": "zstd"}
READABLE = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
SNIPPET_CHARS = 120
DOCUMENT_SCHEMA = pa.schema(
    [
        ("doc_id", pa.int64()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("line", pa.int64()),
        ("text", pa.string()),
        ("reason", pa.string()),
        ("snippet", pa.string()),
        ("raw_bytes", pa.int64()),
    ]
)

# Project Gutenberg wraps each book in a licence header and footer, between these markers.
PG_START = re.compile(rb"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", re.M)
PG_END = re.compile(rb"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", re.M)
BLANK_LINE = re.compile(rb"[ \t\r\f\v]*")


def source_name(paths: list[str], name: str | None) -> str:
    return name or PurePosixPath(paths[0].rstrip("/")).name.split("*")[0].split(".")[0] or "source"


def doc_id(source: str, path: str, line: int) -> int:
    """A stable 64-bit id: where the document starts, so reruns and other nodes agree."""
    digest = hashlib.blake2b(f"{source}\0{path}\0{line}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


# -- finding files -------------------------------------------------------------------------


def list_files(pattern: str) -> tuple[list[str], list[str], object]:
    """(readable files, ignored files, pyarrow filesystem or None for local) for a file,
    directory, glob or URI. A file named explicitly is read whatever its suffix; inside
    directories and globs only readable suffixes count, and the rest are reported."""
    if "://" in pattern:
        return _list_remote(pattern)
    path = Path(pattern).expanduser()
    if path.is_file():
        return [str(path.resolve())], [], None
    candidates = path.rglob("*") if path.is_dir() else map(Path, glob.glob(str(path), recursive=True))
    found = sorted(str(p.resolve()) for p in candidates if p.is_file())
    return [f for f in found if _readable(f)], [f for f in found if not _readable(f)], None


def list_source(pattern: str, key: str) -> tuple[list[str], list[str], object]:
    """list_files for a config entry: a path that cannot be listed or matches nothing is a
    DataError naming the key."""
    try:
        files, ignored, filesystem = list_files(pattern)
    except (OSError, ValueError, ImportError) as err:
        raise DataError(f"{key}: cannot list {pattern!r}: {err}") from None
    if not files:
        raise DataError(f"{key}: {pattern!r} matches no readable files (.txt .md .jsonl .parquet, optionally .gz/.zst)")
    return files, ignored, filesystem


def check_sources(sources, key: str = "data.sources") -> None:
    """Every path of every configured source matches a file: run before Ray starts, so a typo
    costs a fraction of a second instead of a cluster start (20 s here)."""
    for i, source in enumerate(sources):
        for pattern in source.paths:
            list_source(pattern, f"{key}.{i}.paths")


def _list_remote(uri: str):
    import pyarrow.fs as pafs

    if uri.startswith("hf://"):
        from huggingface_hub import HfFileSystem  # hf:// datasets through fsspec

        fs, root = pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem())), uri[len("hf://") :]
    else:
        fs, root = pafs.FileSystem.from_uri(uri)
    prefix = root.split("*", 1)[0].rsplit("/", 1)[0] if "*" in root else root
    if fs.get_file_info(prefix).type == pafs.FileType.File:
        return [prefix], [], fs
    entries = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    found = sorted(
        e.path
        for e in entries
        if e.type == pafs.FileType.File and fnmatch.fnmatch(e.path, root if "*" in root else "*")
    )
    return [f for f in found if _readable(f)], [f for f in found if not _readable(f)], fs


def _readable(name: str) -> bool:
    suffixes = PurePosixPath(name).suffixes
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in READABLE


def file_stamp(path: str, filesystem=None) -> tuple[int, int | None]:
    """(size, mtime in ns) of a listed file, for cache keys: through its pyarrow filesystem for a
    URI (list_files gives such paths without their scheme, e.g. bucket/key), else os.stat."""
    if filesystem is None:
        stat = Path(path).stat()
        return stat.st_size, stat.st_mtime_ns
    info = filesystem.get_file_info(path)
    return info.size, info.mtime_ns


def file_format(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    suffixes = PurePosixPath(path).suffixes
    suffix = suffixes[-2] if len(suffixes) > 1 and suffixes[-1] in COMPRESSION else (suffixes or [""])[-1]
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    return "parquet" if suffix in PARQUET_SUFFIXES else "text"


# -- parsing one file ------------------------------------------------------------------------


def documents_of_file(
    row: dict, source: str, fmt: str, text_field: str, doc_boundary: str, strip_boilerplate: bool
) -> list[dict]:
    """One file's bytes -> document rows (rejected ones carry a reason); prepare calls it per file."""
    path = row["path"]
    reader = Reader(source, path)
    data = reader.decompress(row["bytes"])
    if data is None:
        return reader.rows
    if not data:
        return reader.reject(1, "empty_file", b"")
    if fmt == "parquet":
        return reader.parquet(data, text_field)
    if looks_binary(data):
        return reader.reject(1, "binary_file", data)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark says nothing about the text
        reader.fix("bom_removed")
    if not data.strip():
        return reader.reject(1, "blank_file", data)
    if fmt == "jsonl":
        return reader.jsonl(data, text_field)
    first_line = 1
    if strip_boilerplate:
        data, first_line = reader.strip_gutenberg(data)
    return reader.text(data, doc_boundary, first_line)


def looks_binary(data: bytes, probe: int = 8192) -> bool:
    """More than 10% control bytes (besides tab, newline, CR, form feed) in the first 8 KiB:
    an image or archive, not text with a stray NUL. UTF-8 text has none but tab/CR/LF."""
    head = data[:probe]
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13))
    return controls > 0.1 * len(head)


class Reader:
    """Builds the rows of one file."""

    def __init__(self, source: str, path: str):
        self.source, self.path = source, path
        self.rows: list[dict] = []

    def keep(self, line: int, text: str, raw_bytes: int) -> None:
        self.rows.append(self._row(line, text, "", "", raw_bytes))

    def reject(self, line: int, reason: str, raw: bytes) -> list[dict]:
        snippet = raw[: SNIPPET_CHARS * 4].decode("utf-8", errors="replace")[:SNIPPET_CHARS]
        self.rows.append(self._row(line, "", reason, snippet, len(raw)))
        return self.rows

    def fix(self, what: str) -> None:
        """A repair that keeps the data (e.g. a BOM removed): counted, never an error."""
        self.rows.append(self._row(0, "", f"fixed:{what}", "", 0))

    def _row(self, line, text, reason, snippet, raw_bytes) -> dict:
        return {
            "doc_id": doc_id(self.source, self.path, line),
            "source": self.source,
            "path": self.path,
            "line": line,
            "text": text,
            "reason": reason,
            "snippet": snippet,
            "raw_bytes": raw_bytes,
        }

    def decompress(self, data: bytes) -> bytes | None:
        codec = COMPRESSION.get(PurePosixPath(self.path).suffix)
        if not codec:
            return data
        try:
            return pa.CompressedInputStream(pa.BufferReader(data), codec).read()
        except (OSError, pa.ArrowException):
            self.reject(1, "corrupt_compression", data)
            return None

    def strip_gutenberg(self, data: bytes) -> tuple[bytes, int]:
        start, end = PG_START.search(data), PG_END.search(data)
        if not start:
            return data, 1
        body = data[start.end() : end.start() if end and end.start() > start.end() else len(data)]
        self.fix("gutenberg_boilerplate")
        return body, data.count(b"\n", 0, start.end()) + 1

    def text(self, data: bytes, boundary: str, first_line: int) -> list[dict]:
        for line, chunk in split_text(data, boundary, first_line):
            try:
                self.keep(line, chunk.decode("utf-8"), len(chunk))
            except UnicodeDecodeError:
                self.reject(line, "invalid_utf8", chunk)
        return self.rows

    def jsonl(self, data: bytes, field: str) -> list[dict]:
        for i, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except UnicodeDecodeError:
                self.reject(i, "invalid_utf8", raw)
                continue
            except ValueError:
                self.reject(i, "malformed_json", raw)
                continue
            if not isinstance(record, dict) or field not in record:
                self.reject(i, "missing_field", raw)
            elif not isinstance(record[field], str):
                self.reject(i, "wrong_field_type", raw)
            else:
                self.keep(i, record[field], len(raw))
        return self.rows

    def parquet(self, data: bytes, field: str) -> list[dict]:
        try:
            table = pq.read_table(pa.BufferReader(data), columns=[field])
        except (pa.ArrowException, KeyError, OSError):
            return self.reject(1, "unreadable_parquet", data[:SNIPPET_CHARS])
        column = table.column(field)
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            return self.reject(1, "wrong_field_type", str(column.type).encode())
        for i, value in enumerate(column.to_pylist(), start=1):
            if value is None:
                self.reject(i, "missing_field", b"")
            else:
                self.keep(i, value, len(value.encode()))
        return self.rows


def split_text(data: bytes, boundary: str, first_line: int = 1):
    """Yield (line number, bytes) documents: the whole file, each line, or each blank-line
    separated paragraph. Works on bytes so invalid UTF-8 stays local to its document."""
    data = data.replace(b"\r\n", b"\n")
    if boundary == "file":
        yield first_line, data
        return
    lines = data.split(b"\n")
    if boundary == "line":
        for i, line in enumerate(lines):
            if line.strip():
                yield first_line + i, line
        return
    start, block = None, []
    for i, line in enumerate(lines):
        if BLANK_LINE.fullmatch(line):
            if block:
                yield first_line + start, b"\n".join(block)
            start, block = None, []
        else:
            start = i if start is None else start
            block.append(line)
    if block:
        yield first_line + start, b"\n".join(block)
