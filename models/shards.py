"""Reading safetensors wherever a model or checkpoint lives (a local disk, a volume, s3://,
gs://: a raylm.storage.Location), by byte ranges: a rank resuming from object storage reads
the slices it keeps, not the files that hold them (at 7B on 64 ranks, 1/64 of 84 GB each).

`SafetensorsFile` checks a file's header as safetensors does (an 8-byte length, JSON, every
tensor's dtype, shape and offsets inside the file) before reading any tensor; nothing is ever
unpickled. `ShardReader` is the torch.distributed.checkpoint reader of a checkpoint's
`state/` shards in torch's Hugging Face layout, where each file's metadata records where its
slices sit in the whole tensors.
"""

from __future__ import annotations

import json
import math
import struct
from collections import defaultdict

import torch
from torch.distributed.checkpoint import StorageReader
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.futures import Future

from raylm.errors import DataError
from raylm.storage import Location

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
# Where torch's Hugging Face writer records each slice's offset in the whole tensor, in a
# file's metadata (torch/distributed/checkpoint/_hf_utils.py: DCP_SHARDING_INFO, saved_offsets).
SHARDING_INFO, SAVED_OFFSETS = "DCP_SHARDING_INFO", "saved_offsets"


class SafetensorsFile:
    """One safetensors file: its header read and checked at once, tensors (or rows of one)
    read on demand. `bytes_read` counts what was fetched."""

    def __init__(self, location: Location):
        self.location = location
        self.file = location.fs.open_input_file(location.path)
        self.bytes_read = 0
        try:
            self.entries, self.metadata, self.start = self._header(self.file.size())
        except (struct.error, ValueError, KeyError, TypeError) as err:
            self.file.close()
            raise DataError(
                f"{location} is not a safetensors file ({err}); raylm loads weights only from safetensors"
            ) from None

    def _header(self, size: int) -> tuple[dict, dict, int]:
        (length,) = struct.unpack("<Q", self._read(8, 0))
        if length > min(MAX_HEADER, size - 8):
            raise ValueError(f"a header of {length} bytes in a file of {size}")
        header = json.loads(self._read(length, 8))
        metadata = header.pop("__metadata__", None) or {}
        entries = {name: _checked(name, entry, size - 8 - length) for name, entry in header.items()}
        return entries, metadata, 8 + length

    def _read(self, size: int, offset: int) -> bytes:
        data = self.file.read_at(size, offset)
        if len(data) != size:
            raise ValueError(f"{len(data)} bytes where {size} were expected at offset {offset}")
        self.bytes_read += size
        return data

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """A tensor, or the rows `rows` of it (dim 0, the one FSDP2 shards along): one ranged
        read of exactly those bytes."""
        dtype, shape, begin = self.entries[name]
        if not shape:
            rows = None
        first, stop = (rows.start, rows.stop) if rows else (0, shape[0] if shape else 1)
        row_bytes = dtype.itemsize * math.prod(shape[1:])
        data = bytearray(self._read((stop - first) * row_bytes, self.start + begin + first * row_bytes))
        tensor = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return tensor.reshape((stop - first, *shape[1:]) if shape else ())

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _checked(name: str, entry: dict, data_size: int) -> tuple[torch.dtype, tuple[int, ...], int]:
    """(dtype, shape, offset in the data) of a header entry, after the checks safetensors makes."""
    dtype, shape = DTYPES[entry["dtype"]], tuple(int(n) for n in entry["shape"])
    begin, end = (int(n) for n in entry["data_offsets"])
    if not 0 <= begin <= end <= data_size or end - begin != dtype.itemsize * math.prod(shape):
        raise ValueError(f"{name}: bytes {begin}..{end} do not hold a {entry['dtype']} tensor of shape {list(shape)}")
    return dtype, shape, begin


class ShardReader(StorageReader):
    """torch.distributed.checkpoint's reader for a directory of shards in torch's Hugging Face
    layout, on any Location. The coordinating rank reads every file's header (two small reads
    per file) to plan; each rank then reads only the rows of the slices its plan holds.
    `bytes_read` counts this rank's reads."""

    def __init__(self, directory: Location):
        self.directory = directory
        self.where: dict[MetadataIndex, str] = {}
        self.bytes_read = 0

    def reset(self, checkpoint_id=None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False  # constructed with its directory, never from an id

    def read_metadata(self, *args, **kwargs) -> Metadata:
        tensors: dict[str, TensorStorageMetadata] = {}
        where: dict[MetadataIndex, str] = {}
        for location in self.directory.glob("*.safetensors"):
            with SafetensorsFile(location) as f:
                offsets = json.loads(f.metadata.get(SHARDING_INFO, "{}"))
                for name in f.keys():
                    shape = f.shape(name)
                    offset = torch.Size(offsets.get(name, {}).get(SAVED_OFFSETS, [0] * len(shape)))
                    whole = tensors.setdefault(
                        name, TensorStorageMetadata(TensorProperties(dtype=f.dtype(name)), torch.Size(shape), [])
                    )
                    whole.chunks.append(ChunkStorageMetadata(offset, torch.Size(shape)))
                    whole.size = torch.Size(max(n, o + s) for n, o, s in zip(whole.size, offset, shape))
                    where[MetadataIndex(name, offset)] = location.name
        return Metadata(state_dict_metadata=tensors, storage_data=where)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        self.where = metadata.storage_data

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def read_data(self, plan, planner) -> Future[None]:
        by_file = defaultdict(list)
        for item in plan.items:
            by_file[self.where[item.storage_index]].append(item)
        for name, items in sorted(by_file.items()):
            with SafetensorsFile(self.directory / name) as f:
                for item in items:
                    target = planner.resolve_tensor(item).detach()
                    target.copy_(_slice_of(f, item, tuple(target.shape)))
                    planner.commit_tensor(item, target)
                self.bytes_read += f.bytes_read
        done: Future[None] = Future()
        done.set_result(None)
        return done


def read_part(f: SafetensorsFile, name: str, offsets, lengths) -> torch.Tensor:
    """The block of a stored tensor at `offsets` with sizes `lengths`: its rows read from
    storage, the other dimensions cut in memory."""
    offsets, lengths = tuple(offsets), tuple(lengths)
    value = f.read(name, slice(offsets[0], offsets[0] + lengths[0]) if lengths else None)
    if len(lengths) > 1:
        value = value[(slice(None), *(slice(o, o + n) for o, n in zip(offsets[1:], lengths[1:])))]
    return value


def _slice_of(f: SafetensorsFile, item, expected: tuple[int, ...]) -> torch.Tensor:
    """The part of a stored slice a DCP read item asks for."""
    value = read_part(f, item.storage_index.fqn, item.storage_offsets, item.lengths)
    if tuple(value.shape) != expected:
        raise DataError(f"{f.location}: {item.storage_index.fqn} is {tuple(value.shape)} where {expected} was planned")
    return value
