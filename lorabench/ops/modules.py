"""Frozen 4-bit linear layers for the quantized-LoRA methods: `qlora` (arXiv 2305.14314), `qa-lora`
(arXiv 2309.14717) and `loftq` (arXiv 2310.08659).

    NF4Linear.from_linear(linear, blocksize=64, double_quant=True, compute_dtype=None)   # QLoRA, LoftQ
    Int4Linear.from_linear(linear, group_size=64, compute_dtype=None)                   # QA-LoRA

Both hold the packed weight as buffers (saved by state_dict; a module built with the same arguments
loads them back), a frozen bias, and expose the same small API:

    .in_features, .out_features
    .dequantize(dtype=None) -> (out, in)    the dense weight the layer computes with
    .forward(x)                             y = x W^T + b
    .forward_lora(x, lora_A, lora_B, scale) y = x W^T + b + scale (x A^T) B^T in one fused op
                                            (Int4Linear: lora_A (r, in / group_size) acts on the
                                            group-averaged input, QA-LoRA; or (r, in), plain LoRA)

x is cast to `compute_dtype` (default: x's own dtype) before the op, the output is returned in it.
The adapters themselves (their init, dropout, training) belong to the methods.
"""
from __future__ import annotations

import torch
from torch import nn

from lorabench.ops import int4 as _int4
from lorabench.ops import nf4 as _nf4


class _Frozen4Bit(nn.Module):
    """Shared part: the frozen bias, the compute dtype, the public signature."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype | None):
        super().__init__()
        if compute_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype must be None (x's dtype), float32, bfloat16 or float16, got {compute_dtype}")
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    # forward/forward_lora read the buffers from self._buffers: nn.Module.__getattr__ costs about a
    # microsecond per buffer, which is a visible part of a batch-1 call on a small layer.
    def _tensors(self, names: tuple[str, ...]) -> list:
        b = self._buffers
        try:
            return [b[n] for n in names]
        except KeyError:  # a method made one of them a parameter (qa-lora's zero points)
            return [getattr(self, n) for n in names]

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        return x if cd is None or x.dtype == cd else x.to(cd)

    def _bias(self, bias, dtype):
        return bias if bias is None or bias.dtype == dtype else bias.to(dtype)

    @staticmethod
    def _cast_lora(t, dtype):
        return t if t is None or t.dtype == dtype else t.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_lora(x, None, None, 1.0)  # forward_lora: defined by each format

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class NF4Linear(_Frozen4Bit):
    """A frozen NF4 linear layer (QLoRA sec. 3): bitsandbytes' layout, optional double quantization.

    Needs in_features * out_features elements; in_features need not be a multiple of the block size
    (blocks run over the flattened weight, as in bitsandbytes), but the fast CPU kernel needs
    in_features % 64 == 0 and in_features % blocksize == 0 (other shapes dequantize, then matmul)."""

    _NAMES = ("packed", "absmax", "absmax2", "code2", "offset", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, compute_dtype)
        if blocksize not in _nf4.BLOCKSIZES:
            raise ValueError(f"NF4Linear: blocksize {blocksize} is not one of {_nf4.BLOCKSIZES}")
        n = in_features * out_features
        blocks = -(-n // blocksize)
        self.blocksize, self.double_quant = blocksize, double_quant
        self.register_buffer("packed", torch.zeros((n + 1) // 2, dtype=torch.uint8))
        self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8 if double_quant else torch.float32))
        nested = -(-blocks // _nf4.NESTED_BLOCKSIZE)
        self.register_buffer("absmax2", torch.zeros(nested) if double_quant else None)
        self.register_buffer("code2", _nf4._DYNAMIC_CODE.clone() if double_quant else None)
        self.register_buffer("offset", torch.zeros(()) if double_quant else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """Quantize `linear.weight` (out, in) to NF4; the bias is kept (frozen) in fp32."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize, double_quant,
                  compute_dtype).to(linear.weight.device)
        mod.load_state(_nf4.nf4_quantize(linear.weight.detach(), blocksize, double_quant))
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().float())
        return mod

    def load_state(self, state: _nf4.NF4Weight) -> None:
        """Replace the quantized weight (e.g. LoftQ's alternating re-quantization)."""
        if state.shape != (self.out_features, self.in_features) or state.blocksize != self.blocksize \
                or state.double_quant != self.double_quant:
            raise ValueError(f"NF4Linear.load_state: expected shape {(self.out_features, self.in_features)}, "
                             f"blocksize {self.blocksize}, double_quant {self.double_quant}; got {state.shape}, "
                             f"{state.blocksize}, {state.double_quant}")
        for name in ("packed", "absmax", "absmax2", "code2", "offset"):
            if getattr(self, name) is not None:
                getattr(self, name).copy_(getattr(state, name))

    @property
    def state(self) -> _nf4.NF4Weight:
        return _nf4.NF4Weight(self.packed, self.absmax, (self.out_features, self.in_features), self.blocksize,
                              self.absmax2, self.code2, self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return _nf4.nf4_dequantize(self.state, dtype or self.compute_dtype or torch.float32)

    def forward_lora(self, x, lora_A, lora_B, scale: float) -> torch.Tensor:
        x = self._cast(x)
        dt = x.dtype
        packed, absmax, absmax2, code2, offset, bias = self._tensors(self._NAMES)
        return _nf4.nf4_linear_tensors(x, packed, absmax, absmax2, code2, offset, (self.out_features, self.in_features),
                                       self.blocksize, self._bias(bias, dt), self._cast_lora(lora_A, dt),
                                       self._cast_lora(lora_B, dt), scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", blocksize={self.blocksize}, double_quant={self.double_quant}"


class Int4Linear(_Frozen4Bit):
    """A frozen group-wise int4 linear layer (QA-LoRA sec. 3.2): W = scale * q + zero per group of
    `group_size` inputs (32, 64 or 128; must divide in_features). `merge_lora` folds a QA-LoRA adapter
    into the zero points (sec. 3.3), so the merged model stays int4."""

    _NAMES = ("packed", "scales", "zeros", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 64,
                 compute_dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, compute_dtype)
        if group_size not in _int4.GROUP_SIZES or in_features % group_size:
            raise ValueError(f"Int4Linear: group_size must be one of {_int4.GROUP_SIZES} and divide in_features "
                             f"({in_features}), got {group_size}")
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("zeros", torch.zeros(out_features, groups))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64,
                    compute_dtype: torch.dtype | None = None) -> "Int4Linear":
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                  compute_dtype).to(linear.weight.device)
        s = _int4.int4_quantize(linear.weight.detach(), group_size)
        mod.packed.copy_(s.packed)
        mod.scales.copy_(s.scales)
        mod.zeros.copy_(s.zeros)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().float())
        return mod

    @property
    def state(self) -> _int4.Int4Weight:
        return _int4.Int4Weight(self.packed, self.scales, self.zeros, self.group_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return _int4.int4_dequantize(self.state, dtype or self.compute_dtype or torch.float32)

    def forward_lora(self, x, lora_A, lora_B, scale: float) -> torch.Tensor:
        x = self._cast(x)
        dt = x.dtype
        packed, scales, zeros, bias = self._tensors(self._NAMES)
        return _int4.int4_linear_tensors(x, packed, scales, zeros, self.group_size, self._bias(bias, dt),
                                         self._cast_lora(lora_A, dt), self._cast_lora(lora_B, dt), scale)

    @torch.no_grad()
    def merge_lora(self, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> None:
        """QA-LoRA merge in place: zeros += scale (B A) / group_size; lora_A must be (r, in / group_size)."""
        self.zeros.copy_(_int4.int4_merge_lora(self.state, lora_A, lora_B, scale))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"
