"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update B @ A.

    y = x W^T + (alpha / r) * dropout(x) A^T B^T      A (r, in), B (out, r), B starts at 0

so a fresh adapter leaves the model unchanged. The wrapped layer keeps its `weight` under the
same name, so a base checkpoint loads into an adapted model as is; only `lora_A` and `lora_B`
are new. Merging folds the update into `weight` and gives back a plain GPT. Plain PyTorch:
parallelism (DDP, FSDP2) is applied to the adapted model from outside, like to any other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Linear layers a target name may pick, by the attribute name they have in each block.
TARGETABLE = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wv")  # the original paper's choice for attention

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        unknown = [t for t in self.targets if t not in TARGETABLE]
        if unknown or not self.targets or self.rank <= 0:
            raise ValueError(f"LoRA targets must be among {TARGETABLE} and rank > 0, got {self}")

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, lora: LoraConfig):
        # On the meta device: the throwaway weight would cost a second copy of a 7B model's layer.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the same tensors: the base stays as loaded
        self.lora_A = nn.Parameter(torch.empty(lora.rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, lora.rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = lora.alpha / lora.rank
        self.lora_dropout = nn.Dropout(lora.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return super().forward(x) + self.scale * update

    def merged(self) -> nn.Linear:
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scale * (self.lora_B @ self.lora_A))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


ADAPTERS = ("lora_A", "lora_B")


def is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTERS


def adapter_initial_value(name: str, shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
    """An adapter's initial values, whole: A as LoRALinear draws it (nn.Linear's uniform within
    1/sqrt(fan_in)), B zeros, so the adapted model starts equal to its base. For a model built
    on the meta device and sharded (pipelines/train/parallelize.py)."""
    if name.endswith("lora_B"):
        return torch.zeros(shape)
    bound = 1 / math.sqrt(shape[1])  # kaiming_uniform_ with a=sqrt(5): gain sqrt(1/3), times sqrt(3)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def apply_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Wrap every targeted linear layer in place and freeze everything else; returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in lora.targets and isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
                setattr(parent, name, LoRALinear(child, lora))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer; the model is then a plain GPT again, all trainable."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied embedding counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
