"""The LoRA linear layer: h = W0 x + (alpha/r) B A x  (eq. (3) of LoRA, arXiv 2106.09685)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoraLinear(nn.Module):
    """Wraps a frozen nn.Linear `base` with a trainable low-rank update B A, scaled by `scale`."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0,
                 init: str = "kaiming", kernel: str = "reference"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoraLinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale, self.dropout_p, self.kernel = rank, scale, dropout, kernel
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))  # (r, k)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))  # (d, r)
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / PEFT's default
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / rank)  # PEFT's "gaussian": N(0, 1/r)
        else:
            raise ValueError(f"unknown LoRA init {init!r}; valid: kaiming, gaussian")
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)  # ΔW = s B A, (d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.kernel == "fused":
            from lorabench import ops
            return ops.lora_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B,
                                   self.scale, self.dropout_p, self.training, kernel="fused")
        h = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        return self.base(x) + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}, kernel={self.kernel}"
