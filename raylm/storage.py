"""Where checkpoints live: a local directory, a mounted volume, or object storage (`s3://`,
`gs://`), all reached through a pyarrow FileSystem, the client Ray Train uploads checkpoints
with. `Location` reads like a pathlib.Path (`/`, name, parent, is_file, read_text, glob), so
the code that finds, checks and loads checkpoints is the same for all three.

Object storage: pyarrow takes the endpoint and credentials from the environment
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...; on a cluster the pods get them from
cluster.secret). A FileSystem pickled to a Ray worker keeps its endpoint, never its keys.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from raylm.errors import DataError

OBJECT_STORES = ("s3://", "gs://")  # what pyarrow reaches natively and Ray Train can upload to
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class Location:
    """A file or directory on a pyarrow FileSystem: `path` is the filesystem's own ("/abs/dir"
    locally, "bucket/prefix/dir" on S3), `scheme` what turns it back into a URI ("" locally).
    Equal, and hashed, by that URI."""

    fs: pafs.FileSystem = field(compare=False)
    path: str
    scheme: str = ""

    @classmethod
    def on(cls, fs: pafs.FileSystem, path: str) -> Location:
        """A path on a FileSystem handed over by another library (Ray Train's checkpoints)."""
        return cls(fs, path, {"s3": "s3://", "gcs": "gs://"}.get(fs.type_name, ""))

    def __str__(self) -> str:
        return self.scheme + self.path

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, name), self.scheme)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> Location:
        return Location(self.fs, posixpath.dirname(self.path.rstrip("/")), self.scheme)

    @property
    def local(self) -> Path | None:
        """The local path, or None on object storage."""
        return None if self.scheme else Path(self.path)

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        # Object stores have no directories: pyarrow reports one where objects share the prefix.
        return self.info().type == pafs.FileType.Directory

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def size(self) -> int:
        return self.info().size

    def read_bytes(self) -> bytes:
        with self.fs.open_input_file(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def glob(self, pattern: str, kind: pafs.FileType = pafs.FileType.File) -> list[Location]:
        """The files (or, with `kind`, directories) directly under this directory whose names
        match `pattern`, sorted by name; [] if it does not exist. One listing request."""
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        names = sorted(posixpath.basename(e.path) for e in self.fs.get_file_info(selector) if e.type == kind)
        return [self / n for n in names if fnmatch.fnmatchcase(n, pattern)]

    def subdirs(self, pattern: str) -> list[Location]:
        return self.glob(pattern, pafs.FileType.Directory)

    def files(self) -> list[tuple[str, int]]:
        """Every file under this directory, as (path relative to it, size), sorted."""
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        infos = [e for e in self.fs.get_file_info(selector) if e.type == pafs.FileType.File]
        return sorted((posixpath.relpath(e.path, self.path), e.size) for e in infos)


@contextmanager
def written_to(out: Location) -> Iterator[Path]:
    """A local directory to write `out`'s files into: `out` itself when it is local, else a
    temporary one whose files are uploaded once the block ends without an error."""
    if out.local is not None:
        out.local.mkdir(parents=True, exist_ok=True)
        yield out.local
        return
    with tempfile.TemporaryDirectory(prefix="raylm-upload-") as tmp:
        yield Path(tmp)
        pafs.copy_files(tmp, out.path, destination_filesystem=out.fs)


def locate(where: str | Path | Location) -> Location:
    """A local path (made absolute) or an s3:// gs:// URI as a Location."""
    if isinstance(where, Location):
        return where
    text = str(where)
    if not URI.match(text):
        return Location(pafs.LocalFileSystem(), str(Path(text).expanduser().resolve()))
    if not text.startswith(OBJECT_STORES):
        raise DataError(f"{text}: checkpoints live on a local path, a mounted volume, or {' '.join(OBJECT_STORES)}")
    fs, path = pafs.FileSystem.from_uri(text.rstrip("/"))
    return Location(fs, path, text[: text.index("://") + 3])
