"""A model directory's weights a block at a time, and a safetensors file written a tensor at a
time: the export to Hugging Face and the LoRA merge hold one block (plus the embedding) in
memory, not the model (a 7B block is 0.8 GB in fp32, the model 27 GB)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from raylm.models.config import ModelConfig
from raylm.models.gpt import GPT, Block
from raylm.models.io import load_config, load_lora, read_into, untied
from raylm.models.lora import apply_lora, merge_lora

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def weight_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Every stored weight's name and shape, in the order `blocks` yields them: each block's,
    then the embedding, final norm and head (a tied embedding once, as the head)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in untied(config, GPT(config).state_dict()).items()}
    in_blocks = [k for k in shapes if k.startswith("blocks.")]
    return {k: shapes[k] for k in in_blocks + [k for k in shapes if k not in in_blocks]}


def blocks(directory: str | Path) -> Iterator[dict[str, torch.Tensor]]:
    """A model directory's weights by name, one block's at a time and then the rest, with
    LoRA adapters (if any) folded into their layers."""
    config, lora = load_config(directory), load_lora(directory)
    for i in range(config.n_layer):
        with torch.device("meta"):
            block = Block(config, i)
        block.to_empty(device="cpu")
        if lora:
            apply_lora(block, lora)
        weights = {f"blocks.{i}.{k}": v for k, v in block.state_dict().items()}
        read_into(weights, directory)
        yield {f"blocks.{i}.{k}": v for k, v in (merge_lora(block) if lora else block).state_dict().items()}
    rest = {k: torch.empty(shape) for k, shape in weight_shapes(config).items() if not k.startswith("blocks.")}
    read_into(rest, directory)
    yield rest


class SafetensorsWriter:
    """One safetensors file, written a tensor at a time: the header (every name, dtype, shape
    and offset) first, then each tensor's bytes in the header's order."""

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict):
        header, offset = {"__metadata__": metadata}, 0
        for name, (dtype, shape) in specs.items():
            size = dtype.itemsize * int(torch.Size(shape).numel())
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
        self.pending = list(specs.items())
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close(), after the last tensor
        self.file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, (dtype, shape) = self.pending.pop(0)
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name} {tensor.dtype} {tuple(tensor.shape)} where the header has {expected} {shape}")
        self.file.write(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        self.file.close()
        if self.pending:
            raise ValueError(f"{len(self.pending)} tensors never written, the first {self.pending[0][0]}")


def save_streaming(directory: str | Path, out: Path, rename=lambda name: name, metadata: dict | None = None) -> None:
    """Write a model directory's weights (adapters folded in) to one safetensors file `out`,
    a block at a time, each renamed by `rename`; `out` appears only once it is whole."""
    shapes = weight_shapes(load_config(directory))
    partial = out.with_name(out.name + ".partial")
    writer = SafetensorsWriter(
        partial, {rename(k): (torch.float32, tuple(s)) for k, s in shapes.items()}, metadata or {}
    )
    try:
        for weights in blocks(directory):
            for name in [k for k in shapes if k in weights]:
                writer.write(rename(name), weights[name])
    finally:
        writer.file.close()
    writer.close()
    partial.rename(out)
