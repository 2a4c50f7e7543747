"""What is applied to the plain model from outside before training, in torchtitan's order:
activation checkpointing, then torch.compile, then data parallelism (DDP, or FSDP2 sharding)
over the workers Ray Train started, and the precision each device computes in. `models/`
knows nothing of this."""

from __future__ import annotations

import functools
from contextlib import nullcontext

import ray.train.torch
import torch
import torch.utils.checkpoint
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from raylm.models import GPT


def parallelize(
    model: GPT, strategy: str, activation_checkpointing: bool = False, compile: bool = False
) -> torch.nn.Module:
    """Returns the module to train. Under DDP that is a wrapper around `model`; under FSDP it is
    `model` itself, sharded in place. Either way `model`'s parameter names stay the same, so the
    optimizer and checkpoints address the same tensors."""
    if activation_checkpointing:
        checkpoint_activations(model)
    if compile:
        compile_blocks(model)
    if strategy == "fsdp":
        return shard(model)
    # DDP (gloo on CPU, NCCL on GPU); the model is already on the worker's device.
    return ray.train.torch.prepare_model(model, move_to_device=False)


def shard(model: GPT) -> GPT:
    """FSDP2: each block's parameters, gradients and optimizer state are split across ranks
    and a block's whole weights exist only while it runs (all-gathered in forward, again in
    backward). Per-worker memory for weights + AdamW state falls from 16 bytes per parameter
    to 16/world, which is what lets a 7B model (112 GB) train on 80 GB GPUs."""
    on_gpu = next(model.parameters()).is_cuda
    # bf16 weights for the all-gathers and matmuls halve communication; gradients reduce in fp32.
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if on_gpu
        else MixedPrecisionPolicy()
    )
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the rest: embeddings, final norm, head
    return model


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
