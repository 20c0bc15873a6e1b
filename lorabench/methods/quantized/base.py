"""Frozen 4-bit linear layers that the quantized LoRA methods wrap (QLoRA, LoftQ, QA-LoRA).

Thin modules over the ops of lorabench.ops.nf4 / lorabench.ops.int4 (their compiled kernels when
lorabench._C is built, the pure-PyTorch references otherwise). The quantized tensors are buffers
that are not saved with an adapter: quantization is deterministic, so applying the method to the
same base model rebuilds them exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from lorabench.ops import int4 as int4_ops
from lorabench.ops import nf4 as nf4_ops


class NF4Base(nn.Module):
    """W stored as NF4 (QLoRA sec. 3: 4-bit NormalFloat, blockwise absmax, optional double quantization)."""

    def __init__(self, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                 weight: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        self.blocksize = blocksize
        self.quantize_(linear.weight if weight is None else weight, double_quant)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor, double_quant: bool = True) -> None:
        s = nf4_ops.nf4_quantize(weight.detach(), self.blocksize, double_quant)
        self.shape = s.shape
        for name in ("packed", "absmax", "absmax2", "code2", "offset"):
            self.register_buffer(name, getattr(s, name), persistent=False)

    @property
    def state(self) -> nf4_ops.NF4Weight:
        return nf4_ops.NF4Weight(self.packed, self.absmax, self.shape, self.blocksize, self.absmax2, self.code2,
                                 self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return nf4_ops.nf4_dequantize(self.state, dtype or self.compute_dtype)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_ops.nf4_linear(x, self.state, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4 blocksize={self.blocksize}"


class Int4Base(nn.Module):
    """W stored as group-wise asymmetric int4 (QA-LoRA sec. 3.2, eq. (1)): W ~ scale * q + zero per group.

    The zero points are a frozen Parameter because QA-LoRA merges its adapter into them (sec. 3.3)."""

    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        s = int4_ops.int4_quantize(linear.weight.detach(), group_size)
        self.group_size = group_size
        self.register_buffer("packed", s.packed, persistent=False)
        self.register_buffer("scales", s.scales, persistent=False)
        self.zeros = nn.Parameter(s.zeros, requires_grad=False)  # (out, in / group)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def state(self) -> int4_ops.Int4Weight:
        return int4_ops.Int4Weight(self.packed, self.scales, self.zeros.data, self.group_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return int4_ops.int4_dequantize(self.state, dtype or self.compute_dtype)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_ops.int4_linear(x, self.state, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 group_size={self.group_size}"
