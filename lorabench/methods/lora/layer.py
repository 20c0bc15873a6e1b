"""The LoRA linear layer: h = W0 x + (alpha/r) B A x  (eq. (3) of LoRA, arXiv 2106.09685).

Variants that change only LoRA's initialisation, scaling or forward delta (DoRA, PiSSA, MiLoRA,
QLoRA's quantized base, ...) are `LoraVariant` strategy objects plugged into this one layer
(PEFT's LoraVariant pattern), not forks of it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoraVariant:
    """What a LoRA variant changes; the defaults are plain LoRA. Each hook receives the layer.

    - `init(layer)`: runs after A and B exist (A random, B zero, or swapped by `zero_init`);
      may re-initialise them, add parameters, or rewrite the base weight (PiSSA).
    - `forward(layer, x)`: the adapted output.
    - `delta_weight(layer)`: the dense update ΔW (d, k) that merging adds to W0.
    - `merge(layer)` / `unmerge(layer)`: fold ΔW into the base weight and back.
    """

    def init(self, layer: "LoraLinear") -> None:
        pass

    def forward(self, layer: "LoraLinear", x: torch.Tensor) -> torch.Tensor:
        if layer.kernel == "fused":
            from lorabench import ops
            return ops.lora_linear(x, layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B,
                                   layer.scale, layer.dropout_p, layer.training, kernel="fused")
        h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
        out = layer.base(x)
        delta = F.linear(F.linear(h, layer.lora_A), layer.lora_B)
        if out.dtype != delta.dtype or out.shape != delta.shape:
            return out + delta * layer.scale  # eq. (3), with type promotion or broadcasting
        # eq. (3) in place: the same two roundings as `base(x) + B A h * s` (the product, then the sum), bit for
        # bit, without two (tokens, d) temporaries: 8% of a MiniLM-L6 evaluation's CPU time (docs/architecture.md,
        # "Where a trial's time goes"). Neither op's backward reads the tensor it overwrites.
        return out.add_(delta.mul_(layer.scale))

    def delta_weight(self, layer: "LoraLinear") -> torch.Tensor:
        return layer.scale * (layer.lora_B @ layer.lora_A)  # ΔW = s B A, (d, k)

    def merge(self, layer: "LoraLinear") -> None:
        layer.base.weight += self.delta_weight(layer).to(layer.base.weight.dtype)

    def unmerge(self, layer: "LoraLinear") -> None:
        layer.base.weight -= self.delta_weight(layer).to(layer.base.weight.dtype)


def init_matrix(t: torch.Tensor, init: str, rank: int) -> None:
    """Initialise one LoRA factor in place ('kaiming' or 'gaussian')."""
    if init == "kaiming":
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # as nn.Linear / PEFT's default
    elif init == "gaussian":
        nn.init.normal_(t, std=1.0 / rank)  # PEFT's "gaussian": N(0, 1/r)
    else:
        raise ValueError(f"unknown LoRA init {init!r}; valid: kaiming, gaussian")


class LoraLinear(nn.Module):
    """Wraps a frozen linear `base` with a trainable low-rank update B A, scaled by `scale`.

    `base` is an nn.Linear, or a quantized linear with `in_features`, `out_features`, `bias` and
    `dequantize()` (QLoRA, QA-LoRA). `zero_init` chooses which factor starts at zero so that
    B A = 0 at step 0: "B" (LoRA's choice, Init[A] in arXiv 2406.08447) or "A" (Init[B])."""

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0,
                 init: str = "kaiming", kernel: str = "reference", variant: LoraVariant | None = None,
                 zero_init: str = "B", a_features: int | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear) and not hasattr(base, "dequantize"):
            raise TypeError(f"LoraLinear wraps nn.Linear or a quantized linear, got {type(base).__name__}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale, self.dropout_p, self.kernel = rank, scale, dropout, kernel
        self.variant = variant if variant is not None else LoraVariant()
        like = base.weight if isinstance(base, nn.Linear) else base.dequantize()
        dt, dev = like.dtype, like.device
        k = a_features or self.in_features  # QA-LoRA: A acts on the group-pooled input (in / group)
        self.lora_A = nn.Parameter(torch.zeros(rank, k, dtype=dt, device=dev))  # (r, k)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dt, device=dev))  # (d, r)
        if zero_init == "B":
            init_matrix(self.lora_A, init, rank)
        elif zero_init == "A":
            init_matrix(self.lora_B, init, rank)  # Init[B] of arXiv 2406.08447: B random, A = 0
        else:
            raise ValueError(f"zero_init must be 'B' or 'A', got {zero_init!r}")
        self.merged = False
        self.variant.init(self)

    def delta_weight(self) -> torch.Tensor:
        return self.variant.delta_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return self.variant.forward(self, x)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.variant.merge(self)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.variant.unmerge(self)
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}, "
                f"kernel={self.kernel}, variant={type(self.variant).__name__}")
