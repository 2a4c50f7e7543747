"""What is applied to the plain model from outside before training, as torchtitan's
parallelize.py does: activation checkpointing, then data parallelism through Ray Train, and
the precision each device trains in. `models/` knows nothing of this."""

from __future__ import annotations

import functools
from contextlib import nullcontext

import ray.train.torch
import torch
import torch.utils.checkpoint

from raylm.models import GPT


def parallelize(model: GPT, activation_checkpointing: bool) -> torch.nn.Module:
    if activation_checkpointing:
        checkpoint_activations(model)
    # DDP over the workers Ray Train started (gloo on CPU, NCCL on GPU); the model is already
    # on the worker's device.
    return ray.train.torch.prepare_model(model, move_to_device=False)


def checkpoint_activations(model: GPT) -> None:
    """Each block keeps only its input and recomputes the rest in backward: activation memory
    falls from every layer's intermediates to one residual stream per layer, for about one more
    forward pass of compute. Wraps `forward` in place, so parameter names (and checkpoints)
    stay the same."""
    for block in model.blocks:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def autocast(device: torch.device):
    """bf16 matmuls on GPU, with fp32 weights and optimizer state; fp32 on CPU, where bf16
    autocast is usually slower than fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
