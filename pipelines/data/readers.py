"""Raw files -> documents. Every problem with the input becomes a row with a reason, the file
and the line, so it is counted (and, in strict mode, reported by prepare); nothing is dropped
silently.

A document row: source, path, line (1-based line, or row for Parquet, where it starts),
text, reason ("" while it is kept), snippet (the start of a rejected document) and
raw_bytes (its size as read). Plain Python: Ray Data calls `read_documents` per file, which
reads it as a stream in bounded blocks (lines for text and JSONL, batches of the text column for
Parquet) and yields a table per block, so a multi-GB shard needs no more memory than a small one.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
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


# -- reading one file in bounded blocks ---------------------------------------------------------

# 4 MiB of decompressed bytes per block. Reading holds about 10 blocks' worth at its peak (the block
# and the part line carried over, its lines, their texts, the rows, the Arrow table, allocator
# slack): a 300 MB JSONL file peaked at 150 MB RSS, pyarrow's 110 MB included, the same as a
# 30 MB one; 16 MiB blocks peaked at 260 MB and were no faster (tests/test_readers.py).
READ_BLOCK_BYTES = 4 * 2**20
# The binary probe, the byte-order mark and Project Gutenberg's START marker are looked for in the
# first MiB (a Gutenberg header is 1-30 KB). A stream that turns out corrupt inside it rejects the
# whole file before any row, as a whole-file read did.
HEAD_BYTES = 2**20
NON_BLANK = re.compile(rb"[^ \t\n\r\x0b\x0c]")  # what bytes.strip() keeps
BOM = b"\xef\xbb\xbf"


class CorruptStream(Exception):
    """The codec failed on the file's own bytes (not on a read error of the storage)."""


@dataclass(frozen=True)
class RawFile:
    """Where a file's raw bytes come from: a local path, a path on a pyarrow filesystem (a URI's
    bucket/key, as list_files gives it), or bytes already in memory."""

    path: str
    filesystem: object = None
    data: bytes | None = None

    def stream(self):
        """Sequential raw bytes, no codec guessing (the filesystem's 'detect' would gunzip)."""
        if self.data is not None:
            return pa.BufferReader(self.data)
        if self.filesystem is None:
            return pa.OSFile(self.path)
        return self.filesystem.open_input_stream(self.path, compression=None)

    def random_access(self):
        if self.data is not None:
            return pa.BufferReader(self.data)
        if self.filesystem is None:
            return pa.OSFile(self.path)
        return self.filesystem.open_input_file(self.path)


def read_documents(
    raw: RawFile,
    source: str,
    fmt: str,
    text_field: str,
    doc_boundary: str,
    strip_boilerplate: bool,
    max_chars: int | None = None,
    block_bytes: int = READ_BLOCK_BYTES,
) -> Iterator[pa.Table]:
    """One file -> Arrow tables of document rows (DOCUMENT_SCHEMA), one per block read, so memory
    stays bounded by the block size however large the file. max_chars (cleaning's too_long limit)
    bounds a single document: one over 4 * (max_chars + 1) bytes (480 at least, for its snippet)
    is only counted past its head and comes out cut to its first max_chars + 1 characters (120 at
    least) with its full raw_bytes, which cleaning drops as too_long exactly as it would drop the
    whole text. None: documents are held whole."""
    reader = Reader(source, raw.path)
    codec = COMPRESSION.get(PurePosixPath(raw.path).suffix)
    if fmt == "parquet":
        steps = reader.parquet(raw, codec, text_field, block_bytes)
    else:
        text_cap = None if max_chars is None else 4 * max(max_chars + 1, SNIPPET_CHARS)
        steps = reader.lines(raw, codec, fmt, text_field, doc_boundary, strip_boilerplate, text_cap, block_bytes)
    for _ in steps:
        if reader.rows:
            yield reader.take()
    if reader.rows:
        yield reader.take()


def looks_binary(data: bytes, probe: int = 8192) -> bool:
    """More than 10% control bytes (besides tab, newline, CR, form feed) in the first 8 KiB:
    an image or archive, not text with a stray NUL. UTF-8 text has none but tab/CR/LF."""
    head = data[:probe]
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13))
    return controls > 0.1 * len(head)


class Reader:
    """Builds the rows of one file; `take` hands over those built so far as a table. Each reading
    method is a generator that yields after every block, when its rows may be taken."""

    def __init__(self, source: str, path: str):
        self.source, self.path = source, path
        self.rows: list[tuple[int, str, str, str, int]] = []  # (line, text, reason, snippet, raw_bytes)
        self.line_reached = 1  # where a stream failing now would be reported

    def keep(self, line: int, text: str, raw_bytes: int) -> None:
        self.rows.append((line, text, "", "", raw_bytes))

    def reject(self, line: int, reason: str, raw: bytes, raw_bytes: int | None = None) -> None:
        snippet = raw[: SNIPPET_CHARS * 4].decode("utf-8", errors="replace")[:SNIPPET_CHARS]
        self.rows.append((line, "", reason, snippet, len(raw) if raw_bytes is None else raw_bytes))

    def fix(self, what: str) -> None:
        """A repair that keeps the data (e.g. a BOM removed): counted, never an error."""
        self.rows.append((0, "", f"fixed:{what}", "", 0))

    def take(self) -> pa.Table:
        lines, texts, reasons, snippets, sizes = zip(*self.rows)
        self.rows = []
        columns = {
            "source": [self.source] * len(lines),
            "path": [self.path] * len(lines),
            "line": lines,
            "text": texts,
            "reason": reasons,
            "snippet": snippets,
            "raw_bytes": sizes,
        }
        return pa.Table.from_pydict(columns, schema=DOCUMENT_SCHEMA)

    # -- text and JSONL: lines from a stream --------------------------------------------------

    def lines(self, raw: RawFile, codec, fmt, field, boundary, strip_boilerplate, text_cap, block_bytes):
        with raw.stream() as f:
            blocks = iter(Blocks(f, codec, block_bytes))
            try:
                yield from self._lines(blocks, fmt, field, boundary, strip_boilerplate, text_cap, block_bytes)
            except CorruptStream:
                # A whole-file read rejected the whole file; a stream keeps the rows of the blocks
                # before the failure (a file failing in its first MiB is still rejected whole).
                self._reject_corrupt(raw)

    def _lines(self, blocks, fmt, field, boundary, strip_boilerplate, text_cap, block_bytes):
        first = b"".join(read_head(blocks, HEAD_BYTES))  # one block unless blocks are small
        if not first:
            return self.reject(1, "empty_file", b"")
        if looks_binary(first):
            return self.reject(1, "binary_file", first, len(first) + sum(map(len, blocks)))
        if first.startswith(BOM):
            first = first[len(BOM) :]  # a UTF-8 byte-order mark says nothing about the text
            self.fix("bom_removed")
        head, tally = first[:HEAD_BYTES], Tally()
        body = tally.count(chain(slices(first, block_bytes), blocks))
        del first  # the body's generator holds it until it is read
        jsonl = fmt == "jsonl"
        # A JSON line holds more than its text: escapes take up to 12 bytes per character (a
        # surrogate pair), and other fields; one over 4x the text cap is rejected unparsed.
        cap = 4 * text_cap if jsonl and text_cap else text_cap
        lines = NumberedLines(line_runs(body, block_bytes, crlf=not jsonl), cap)
        if jsonl:
            yield from self._jsonl(lines, field)
        else:
            first_line, stop_at_end = self._gutenberg(head) if strip_boilerplate else (1, False)
            runs = gutenberg_body(lines, first_line, stop_at_end) if first_line > 1 else lines
            steps = {"line": self._text_lines, "paragraph": self._paragraphs, "file": self._whole_file}[boundary]
            yield from steps(runs, lines, text_cap, first_line, tally)
        if tally.blank:
            self.reject(1, "blank_file", head, tally.size)

    def _gutenberg(self, head: bytes) -> tuple[int, bool]:
        """(first line of the book's body, whether its first END marker ends it): the body starts
        after the START marker, if there is one in the first MiB, and runs to the first END
        marker, unless that comes before START or right after it."""
        start = PG_START.search(head, 0, HEAD_BYTES)
        if not start:
            return 1, False
        self.fix("gutenberg_boilerplate")
        return head.count(b"\n", 0, start.end()) + 1, not PG_END.search(head, 0, start.start())

    def _jsonl(self, lines: NumberedLines, field: str):
        for run in lines:
            for i, raw in run:
                if isinstance(raw, Piece):
                    if not raw.blank:
                        self.reject(i, "too_long", raw.head, raw.size)  # not parsed: too big to hold
                elif raw.strip():
                    self._json_line(i, raw, field)
            self.line_reached = lines.next
            yield

    def _json_line(self, i: int, raw: bytes, field: str) -> None:
        try:
            record = json.loads(raw)
        except UnicodeDecodeError:
            return self.reject(i, "invalid_utf8", raw)
        except ValueError:
            return self.reject(i, "malformed_json", raw)
        if not isinstance(record, dict) or field not in record:
            self.reject(i, "missing_field", raw)
        elif not isinstance(record[field], str):
            self.reject(i, "wrong_field_type", raw)
        else:
            self.keep(i, record[field], len(raw))

    def _text_lines(self, runs, lines: NumberedLines, cap, first_line, tally):
        for run in runs:
            for i, line in run:
                if not is_blank(line):
                    self._text_doc(i, line)
            self.line_reached = lines.next
            yield

    def _paragraphs(self, runs, lines: NumberedLines, cap, first_line, tally):
        """Blank-line separated paragraphs; one may span blocks, so it is carried as a Piece."""
        paragraph, start = None, 0
        for run in runs:
            for i, line in run:
                if is_blank(line):
                    if paragraph is not None:
                        self._text_doc(start, paragraph.finish())
                    paragraph = None
                    continue
                if paragraph is None:
                    paragraph, start = Piece(cap), i
                else:
                    paragraph.add(b"\n")
                paragraph.add(line)
            self.line_reached = lines.next if paragraph is None else start
            yield
        if paragraph is not None:
            self._text_doc(start, paragraph.finish())

    def _whole_file(self, runs, lines: NumberedLines, cap, first_line, tally):
        """The whole body is one document: held up to the cap, counted past it."""
        document, first = Piece(cap), True
        self.line_reached = first_line
        for run in runs:
            for _, line in run:
                if not first:
                    document.add(b"\n")
                document.add(line)
                first = False
            yield
        if not tally.blank:
            self._text_doc(first_line, document.finish())

    def _text_doc(self, line: int, doc: bytes | Piece) -> None:
        if isinstance(doc, Piece):  # longer than the cap: cleaning drops it as too_long
            if doc.valid:
                self.keep(line, doc.head_text(), doc.size)
            else:
                self.reject(line, "invalid_utf8", doc.head, doc.size)
            return
        try:
            self.keep(line, doc.decode("utf-8"), len(doc))
        except UnicodeDecodeError:
            self.reject(line, "invalid_utf8", doc)

    def _reject_corrupt(self, raw: RawFile) -> None:
        """One row where the stream broke, counting the whole compressed file as before."""
        with raw.random_access() as f:
            self.reject(self.line_reached, "corrupt_compression", f.read(SNIPPET_CHARS * 4), f.size())

    # -- Parquet: batches of the text column ---------------------------------------------------

    def parquet(self, raw: RawFile, codec, field: str, block_bytes: int):
        if codec:  # Parquet needs random access: a compressed Parquet file is decompressed whole
            with raw.stream() as f:
                try:
                    data = b"".join(Blocks(f, codec, block_bytes))
                except CorruptStream:
                    return self._reject_corrupt(raw)
            source = pa.BufferReader(data)
        else:
            source = raw.random_access()
        with source:
            watched = Watched(source)
            if source.size() == 0:
                return self.reject(1, "empty_file", b"")
            try:
                yield from self._parquet_rows(pq.ParquetFile(pa.PythonFile(watched, mode="r")), field, block_bytes)
            except (pa.ArrowException, KeyError, OSError):
                if watched.error is not None:
                    raise  # the storage failed, not the file: Ray retries the task
                self.reject(self.line_reached, "unreadable_parquet", source.read_at(SNIPPET_CHARS, 0))

    def _parquet_rows(self, parquet: pq.ParquetFile, field: str, block_bytes: int):
        column_type = parquet.schema_arrow.field(field).type
        if not pa.types.is_string(column_type) and not pa.types.is_large_string(column_type):
            return self.reject(1, "wrong_field_type", str(column_type).encode())
        row = 1
        for batch in parquet.iter_batches(batch_size=rows_per_block(parquet, field, block_bytes), columns=[field]):
            for value in batch.column(0).to_pylist():
                if value is None:
                    self.reject(row, "missing_field", b"")
                else:
                    self.keep(row, value, len(value.encode()))
                row += 1
            self.line_reached = row
            yield


def rows_per_block(parquet: pq.ParquetFile, field: str, block_bytes: int) -> int:
    """Rows of the text column in about block_bytes, from the row groups' uncompressed sizes
    (pyarrow still reads a row group's column chunk at once: writers keep those to 128 MB-1 GB)."""
    meta = parquet.metadata
    leaf = [parquet.schema.column(i).path for i in range(len(parquet.schema))].index(field)
    size = sum(meta.row_group(g).column(leaf).total_uncompressed_size for g in range(meta.num_row_groups))
    return max(1, block_bytes * meta.num_rows // max(size, 1))


# -- bytes -> lines -> documents ------------------------------------------------------------------


class Watched:
    """A raw file that remembers its own errors, so that a failing disk or network (raised, and
    Ray retries the task) is told apart from a corrupt file (a counted reject row)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def __getattr__(self, name):
        attr = getattr(self.f, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except Exception as err:
                self.error = err
                raise

        return call


class Blocks:
    """A raw stream's decompressed bytes, block_bytes at a time. A codec error ends it with
    CorruptStream; an error of the raw file itself is raised as it is."""

    def __init__(self, f, codec: str | None, block_bytes: int):
        self.raw = Watched(f)
        self.stream = pa.CompressedInputStream(pa.PythonFile(self.raw, mode="r"), codec) if codec else f
        self.block_bytes = block_bytes

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._read, b"")

    def _read(self) -> bytes:
        try:
            return self.stream.read(self.block_bytes)
        except (OSError, pa.ArrowException) as err:
            if self.raw.error is not None or self.stream is self.raw.f:
                raise
            raise CorruptStream(str(err)) from err


def read_head(blocks: Iterator[bytes], size: int) -> list[bytes]:
    """The first blocks, holding at least `size` bytes (all of them if fewer)."""
    parts, got = [], 0
    for block in blocks:
        parts.append(block)
        got += len(block)
        if got >= size:
            break
    return parts


class Tally:
    """Bytes that passed through, and whether all of them were whitespace."""

    def __init__(self):
        self.size, self.blank = 0, True

    def count(self, blocks: Iterable[bytes]) -> Iterator[bytes]:
        return map(self._see, blocks)

    def _see(self, block: bytes) -> bytes:
        self.size += len(block)
        if self.blank and NON_BLANK.search(block):
            self.blank = False
        return block


def line_runs(blocks: Iterable[bytes], block_bytes: int, crlf: bool) -> Iterator[tuple[list[bytes], bool]]:
    """Blocks -> runs of lines, about a block each, as (lines, open): when open, the run's last
    line goes on in the next run's first. Joined that way the runs are data.split(b"\\n") of the
    whole stream (with \\r\\n read as \\n when crlf). Only a part line is carried to the next block,
    and a line longer than a block is passed on in parts, so what is held stays near two blocks."""
    carry = b""
    for block in blocks:
        data = carry + block if carry else block
        del block  # held by the loop while the run is used otherwise
        # \r\n pairs never overlap, so replacing them block by block is replacing them in the
        # whole: the carried part line has no \n, and a part passed on never ends with \r.
        lines = (data.replace(b"\r\n", b"\n") if crlf else data).split(b"\n")
        del data
        carry = lines.pop()
        if lines:
            yield lines, False
        elif len(carry) >= block_bytes:  # no newline in a whole block: pass the line on in parts
            keep = len(carry) - 1 if carry.endswith(b"\r") else len(carry)
            part, carry = carry[:keep], carry[keep:]
            yield [part], True
    yield [carry], False


def slices(data: bytes, size: int) -> Iterator[bytes]:
    """data in parts of `size`, none held here once handed on (a generator's locals live on)."""
    parts = [data[i : i + size] for i in range(0, len(data), size)][::-1]
    del data
    while parts:
        yield parts.pop()


class NumberedLines:
    """Runs of (line number, line) from line_runs. A line is bytes, or a Piece when longer than
    `cap` bytes; `next` is the number of the first line not yet handed out."""

    def __init__(self, runs: Iterator[tuple[list[bytes], bool]], cap: int | None):
        self.runs, self.cap, self.next = runs, cap, 1

    def __iter__(self) -> Iterator[list[tuple[int, bytes | Piece]]]:
        part = None  # a line that goes on in the next run
        for lines, open_end in self.runs:
            numbered = []
            if part is not None:
                part.add(lines[0])
                if open_end and len(lines) == 1:
                    yield numbered
                    continue
                numbered.append((self.next, part.finish()))
                self.next, part, lines = self.next + 1, None, lines[1:]
            if open_end:
                part = Piece(self.cap)
                part.add(lines[-1])
                lines = lines[:-1]
            for line in lines:
                numbered.append(
                    (self.next, line if self.cap is None or len(line) <= self.cap else piece_of(line, self.cap))
                )
                self.next += 1
            yield numbered


def gutenberg_body(lines: NumberedLines, first_line: int, stop_at_end: bool):
    """The runs of a Project Gutenberg book's body: from first_line to the line before the first
    END marker, which ends the stream there (an END marker right after START is ignored, as the
    whole-file rule did). The body ends with the newline before END, hence the last empty line."""
    for run in lines:
        body = []
        for i, line in run:
            if i < first_line:
                continue
            if stop_at_end and PG_END.match(line.head if isinstance(line, Piece) else line):
                if i > first_line:
                    body.append((i, b""))
                    yield body
                    return
                stop_at_end = False
            body.append((i, line))
        yield body


def is_blank(line: bytes | Piece) -> bool:
    return line.blank if isinstance(line, Piece) else bool(BLANK_LINE.fullmatch(line))


class Piece:
    """A document, or a line, arriving in parts. Held whole up to `cap` bytes (None: no cap); past
    the cap only its first `cap` bytes, its size, whether it is blank and whether it is valid
    UTF-8 are kept, so a 50 MB line costs `cap` bytes (4 MB with the default max_chars)."""

    def __init__(self, cap: int | None):
        self.cap, self.parts, self.size = cap, [], 0
        self.blank, self.valid, self.decoder = True, True, None

    @property
    def head(self) -> bytes:
        return self.parts[0] if self.parts else b""

    def add(self, data: bytes | Piece) -> None:
        if isinstance(data, Piece):
            return self._add_piece(data)
        self.size += len(data)
        if self.blank and NON_BLANK.search(data):
            self.blank = False
        if self.decoder is not None:
            self._check(data)
        elif self.cap is not None and self.size > self.cap:
            self._overflow(data)
        else:
            self.parts.append(data)

    def _add_piece(self, other: Piece) -> None:
        """A whole line longer than the cap joins its paragraph (or file): after a newline, so the
        UTF-8 check of this piece goes on cleanly after it."""
        if self.decoder is None:
            self._overflow(b"")
        self.size += other.size
        self.blank, self.valid = self.blank and other.blank, self.valid and other.valid
        if len(self.parts[0]) < self.cap:
            self.parts = [(self.parts[0] + other.head)[: self.cap]]

    def _overflow(self, data: bytes) -> None:
        held = b"".join([*self.parts, data])
        self.parts = [held[: self.cap]]
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self._check(held)

    def _check(self, data: bytes, step: int = 2**20) -> None:
        """UTF-8 validity, a MiB at a time so that no large string is built."""
        try:
            for i in range(0, len(data) if self.valid else 0, step):
                self.decoder.decode(data[i : i + step])
        except UnicodeDecodeError:
            self.valid = False

    def finish(self) -> bytes | Piece:
        """The bytes if held whole; else this piece, its UTF-8 check completed."""
        if self.decoder is None:
            return b"".join(self.parts)
        if self.valid:
            try:
                self.decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                self.valid = False
        return self

    def head_text(self) -> str:
        """Its first cap/4 characters, more than max_chars: the head holds them all, as a
        character takes at most 4 bytes."""
        return codecs.getincrementaldecoder("utf-8")().decode(self.head)[: self.cap // 4]


def piece_of(line: bytes, cap: int) -> Piece:
    piece = Piece(cap)
    piece.add(line)
    return piece.finish()
