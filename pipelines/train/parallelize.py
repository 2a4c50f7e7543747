"""What is applied to the plain model from outside before training, in torchtitan's order:
activation checkpointing, then torch.compile, then data parallelism (DDP, or FSDP2 sharding)
over the process group (Ray Train's workers form it), and the precision each device computes
in. `models/` knows nothing of this, and this module nothing of Ray."""

from __future__ import annotations

import functools
import hashlib
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from raylm.models import GPT
from raylm.models.io import load_weights
from raylm.models.lora import adapter_initial_value, is_adapter
from raylm.storage import Location


def parallelize(
    model: GPT,
    strategy: str,
    device: torch.device,
    seed: int,
    activation_checkpointing: bool = False,
    compile: bool = False,
    init: str | Location | None = None,
) -> torch.nn.Module:
    """Returns the module to train. Under DDP that is a wrapper around `model`; under FSDP it is
    `model` itself, sharded in place. Either way `model`'s parameter names stay the same, so the
    optimizer and checkpoints address the same tensors. A model built on the meta device is
    allocated and initialized here (from `seed`, or its weights from the base model directory
    `init` when fine-tuning): under FSDP after sharding, so no rank ever holds the whole model."""
    if activation_checkpointing:
        checkpoint_activations(model)
    if compile:
        compile_blocks(model)
    if strategy == "fsdp":
        shard(model, device)
    if model.rope_cos.is_meta:
        materialize(model, device, seed, init)
    if strategy == "fsdp":
        return model
    return data_parallel(model, torch.device(device))


def data_parallel(model: GPT, device: torch.device) -> torch.nn.Module:
    """DDP over the process group (gloo on CPU, NCCL on GPU) when there is more than one rank;
    one rank trains the plain model, as Ray Train's prepare_model does. torch's own wrapper,
    not Ray's, so that this module runs without Ray (benchmarks/gpu_check.py)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return model
    on_gpu = device.type == "cuda"
    return DistributedDataParallel(
        model, device_ids=[device] if on_gpu else None, output_device=device if on_gpu else None
    )


def materialize(model: GPT, device: torch.device, seed: int, init: str | Location | None = None) -> None:
    """Allocate a model built on the meta device and draw its initial values: each parameter
    whole, on the CPU, from a generator seeded by `seed` and its name, of which this rank keeps
    its slice. The values are the same under any worker count and strategy (a resume or an FSDP
    run matches a DDP one), and one whole parameter at a time is the most a rank ever holds (the
    embedding: 0.5 GB at 7B, against 27 GB for the model). With `init` (fine-tuning), the
    base's weights are read instead, each rank reading only the rows of its slices; only LoRA
    adapters are drawn."""
    model.to_empty(device=device)
    if model.config.tie_embeddings and model.lm_head.weight is not model.tok_emb.weight:
        model.lm_head.weight = model.tok_emb.weight  # to_empty re-allocates a plain module's two names apart
    model.fill_rope()
    drawn = [(n, p) for n, p in model.named_parameters() if init is None or is_adapter(n)]
    with torch.no_grad():
        for name, param in drawn:
            generator = torch.Generator().manual_seed(param_seed(seed, name))
            initial = adapter_initial_value if is_adapter(name) else model.initial_value
            whole = initial(name, param.shape, generator)
            if isinstance(param, DTensor):  # cut locally (src_data_rank=None): every rank drew the same values
                whole = distribute_tensor(whole.to(device), param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(whole)
    if init is not None:
        names = {n for n, _ in model.named_parameters(remove_duplicate=False)}  # a tied embedding by both names
        load_weights(model, init, only={n for n in names if not is_adapter(n)})


def param_seed(seed: int, name: str) -> int:
    """A generator seed per parameter: the run's seed and the name, hashed (Python's hash() of
    a str differs between processes)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def shard(model: GPT, device: torch.device) -> None:
    """FSDP2: each block's parameters, gradients and optimizer state are split across ranks
    and a block's whole weights exist only while it runs (all-gathered in forward, again in
    backward). Per-worker memory for weights + AdamW state falls from 16 bytes per parameter
    to 16/world, which is what lets a 7B model (112 GB) train on 80 GB GPUs."""
    on_gpu = torch.device(device).type == "cuda"
    # bf16 weights for the all-gathers and matmuls halve communication; gradients reduce in fp32.
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if on_gpu
        else MixedPrecisionPolicy()
    )
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the rest: embeddings, final norm, head


def checkpoint_activations(model: GPT) -> None:
    """Each block keeps only its input and recomputes the rest in backward: activation memory
    falls from every layer's intermediates to one residual stream per layer, for about one more
    forward pass of compute. Wraps `forward` in place, so parameter names (and checkpoints)
    stay the same."""
    for block in model.blocks:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def compile_blocks(model: GPT) -> None:
    """torch.compile each block in place (Module.compile keeps parameter names): one compiled
    graph reused by every layer, so compile time does not grow with depth."""
    for block in model.blocks:
        block.compile()


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """During gradient accumulation only the last micro-batch's backward should reduce
    gradients across ranks: DDP's no_sync() context, FSDP2's requires_gradient_sync flag."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        return nullcontext()
    if enabled or not hasattr(model, "no_sync"):
        return nullcontext()
    return model.no_sync()


def autocast(device: torch.device):
    """bf16 matmuls on GPU, with fp32 weights and optimizer state; fp32 on CPU, where bf16
    autocast is usually slower than fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
