"""Group-wise asymmetric int4 weights and QA-LoRA's quantization-aware LoRA (arXiv 2309.14717).

Scope: the op schemas in the `lorabench` namespace, their fakes, the reference fallback, the public
functions, and QA-LoRA's merge of the LoRA path into the zero points (sec. 3.3).

Ops:

    int4_quantize(W, group_size)                          -> (packed, scales, zeros)
    int4_dequantize(packed, scales, zeros, group_size, dtype) -> W = scale * q + zero
    int4_linear(x, packed, scales, zeros, group_size, bias, A, B, s)
        -> y = x W^T + b + s (P x A^T) B^T

Layout: W (out, in) with in % group_size == 0; each row is cut into groups of `group_size` inputs
(32, 64 or 128); q in [0, 15] is packed two per byte along the row, element 2i in the HIGH nibble
(the order of the NF4 layout), packed (out, in/2) uint8; scales and zeros (out, in/group_size) fp32,
W ~ scale * q + zero with zero = the group's minimum (QA-LoRA eq. (1): alpha * q + beta).
The LoRA path: lora_A (r, in/group_size) acts on the group-averaged input P x (QA-LoRA's pooling, so
that it merges into the zero points), or lora_A (r, in) as plain LoRA.

Backends: the compiled CPU kernels (csrc/cpu/int4*.cpp, csrc/cpu/nf4_int4_gemv.cpp, bound in
csrc/quant_ops.cpp) and CUDA (csrc/cuda/nf4_int4.cu); the references in reference.py are the fallback.
"""
from __future__ import annotations

import dataclasses

import torch

from lorabench.ops import reference
from lorabench.ops._backend import autocast_dtype, cast_to, extension
from lorabench.ops.nf4 import QuantLinearFunction, _check_lora, _check_x_bias, python_autograd

GROUP_SIZES = (32, 64, 128)

_lib = torch.library.Library("lorabench", "FRAGMENT")
_lib.define("int4_quantize(Tensor weight, int group_size) -> (Tensor, Tensor, Tensor)")
_lib.define("int4_dequantize(Tensor packed, Tensor scales, Tensor zeros, int group_size, ScalarType dtype) -> Tensor")
_lib.define(
    "int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group_size, Tensor? bias, "
    "Tensor? lora_A, Tensor? lora_B, float scale) -> Tensor"
)


def _check_weight_shape(out_f, in_f, group_size, op):
    torch._check(group_size in GROUP_SIZES, lambda: f"{op}: group_size {group_size} is not one of {GROUP_SIZES}")
    torch._check(in_f % group_size == 0,
                 lambda: f"{op}: in_features {in_f} is not a multiple of group_size {group_size}; pick a group "
                         f"size that divides it (valid: {GROUP_SIZES})")


def _check_state(packed, scales, zeros, group_size, op):
    torch._check(packed.dtype == torch.uint8 and packed.dim() == 2,
                 lambda: f"{op}: packed must be (out, in/2) uint8, got {packed.dtype} {tuple(packed.shape)}")
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    _check_weight_shape(out_f, in_f, group_size, op)
    g = (out_f, in_f // group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        torch._check(t.dtype == torch.float32 and tuple(t.shape) == g,
                     lambda: f"{op}: {name} must be float32 {g}, got {t.dtype} {tuple(t.shape)}")
    return out_f, in_f


@torch.library.register_fake("lorabench::int4_quantize", lib=_lib)
def _int4_quantize_fake(weight, group_size):
    torch._check(weight.dim() == 2, lambda: f"int4_quantize: weight must be (out, in), got {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    _check_weight_shape(out_f, in_f, group_size, "int4_quantize")
    g = in_f // group_size
    return (weight.new_empty(out_f, in_f // 2, dtype=torch.uint8), weight.new_empty(out_f, g, dtype=torch.float32),
            weight.new_empty(out_f, g, dtype=torch.float32))


@torch.library.register_fake("lorabench::int4_dequantize", lib=_lib)
def _int4_dequantize_fake(packed, scales, zeros, group_size, dtype):
    out_f, in_f = _check_state(packed, scales, zeros, group_size, "int4_dequantize")
    return packed.new_empty(out_f, in_f, dtype=dtype)


@torch.library.register_fake("lorabench::int4_linear", lib=_lib)
def _int4_linear_fake(x, packed, scales, zeros, group_size, bias, lora_A, lora_B, scale):
    out_f, in_f = _check_state(packed, scales, zeros, group_size, "int4_linear")
    _check_x_bias(x, bias, in_f, out_f, "int4_linear")
    _check_lora(x, lora_A, lora_B, in_f, out_f, "int4_linear", pooled_in=in_f // group_size)
    return x.new_empty(x.shape[0], out_f)


@torch.library.impl(_lib, "int4_quantize", "CompositeExplicitAutograd")
def _int4_quantize_ref(weight, group_size):
    return reference.int4_quantize(weight, group_size)


@torch.library.impl(_lib, "int4_dequantize", "CompositeExplicitAutograd")
def _int4_dequantize_ref(packed, scales, zeros, group_size, dtype):
    return reference.int4_dequantize(packed, scales, zeros, group_size, dtype)


@torch.library.impl(_lib, "int4_linear", "CompositeExplicitAutograd")
def _int4_linear_ref(x, packed, scales, zeros, group_size, bias, lora_A, lora_B, scale):
    w = reference.int4_dequantize(packed, scales, zeros, group_size, torch.float32)
    pool = group_size if lora_A is not None and lora_A.shape[1] != w.shape[1] else 1
    return reference.quantized_lora_linear(x, w, bias, lora_A, lora_B, scale, lora_pool=pool)


@dataclasses.dataclass
class Int4Weight:
    """A (out, in) weight in group-wise int4: packed (out, in/2) uint8, scales and zeros (out, in/g) fp32."""
    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def tensors(self):
        return self.packed, self.scales, self.zeros


def int4_quantize(weight: torch.Tensor, group_size: int = 64) -> Int4Weight:
    """Min-max asymmetric int4 per group of `group_size` inputs of each row (QA-LoRA sec. 3.2)."""
    if weight.dim() != 2:
        raise ValueError(f"int4_quantize: weight must be (out, in), got shape {tuple(weight.shape)}")
    if group_size not in GROUP_SIZES or weight.shape[1] % group_size:
        raise ValueError(f"int4_quantize: group_size must be one of {GROUP_SIZES} and divide in_features "
                         f"({weight.shape[1]}), got {group_size}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"int4_quantize: weight.dtype {weight.dtype} is not supported; use float32, bfloat16 or float16")
    return Int4Weight(*torch.ops.lorabench.int4_quantize(weight.detach().contiguous(), group_size), group_size)


def int4_dequantize(state: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight scale * q + zero (fp32, then cast to dtype)."""
    return torch.ops.lorabench.int4_dequantize(*state.tensors(), state.group_size, dtype)


_INT4_LINEAR = torch.ops.lorabench.int4_linear.default


def int4_linear_tensors(x, packed, scales, zeros, group_size, bias=None, lora_A=None, lora_B=None, scale=1.0):
    """int4_linear on the tensors of an Int4Weight (no Int4Weight built): the body of int4_linear and of
    Int4Linear.forward; without autograd, one check and the op call."""
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"int4_linear: x must be (..., in={in_f}), got shape {tuple(x.shape)}")
    if (dt := autocast_dtype(x)) is not None:   # under autocast: x, bias and the factors in its dtype, as F.linear,
        x, bias, lora_A, lora_B = cast_to(dt, x, bias, lora_A, lora_B)   # the op itself with autocast off
        with torch.autocast(x.device.type, enabled=False):
            return int4_linear_tensors(x, packed, scales, zeros, group_size, bias, lora_A, lora_B, scale)
    x2 = x if x.dim() == 2 else x.reshape(-1, in_f)
    if python_autograd(x2, bias, lora_A, lora_B):
        state = Int4Weight(packed, scales, zeros, group_size)
        pool = group_size if lora_A is not None and lora_A.shape[-1] == in_f // group_size else 1
        fn = lambda x2, p, s, z, *rest: _INT4_LINEAR(x2, p, s, z, group_size, *rest)  # noqa: E731
        y = QuantLinearFunction.apply(x2, bias, lora_A, lora_B, float(scale), pool, fn,
                                      lambda dt: int4_dequantize(state, dt), packed, scales, zeros)
    else:
        y = _INT4_LINEAR(x2, packed, scales, zeros, group_size, bias, lora_A, lora_B, float(scale))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_f)


def int4_linear(x: torch.Tensor, state: Int4Weight, bias: torch.Tensor | None = None,
                lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None,
                scale: float = 1.0) -> torch.Tensor:
    """y = x W^T + b + scale (P x A^T) B^T with W = scale * q + zero.

    lora_A: (r, in / group_size) for QA-LoRA (P = average over each group of inputs, sec. 3.3), or
    (r, in) for plain LoRA (P = identity); lora_B: (out, r). Gradients for x, bias, A and B."""
    return int4_linear_tensors(x, state.packed, state.scales, state.zeros, state.group_size, bias, lora_A, lora_B,
                               scale)


def int4_merge_lora(state: Int4Weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """QA-LoRA's merge (sec. 3.3): the new zero points zero + scale (B A) / group_size, with lora_A
    (r, in / group_size) acting on the group-averaged input. The merged layer (same packed q and scales,
    new zeros) computes what int4_linear(x, state, lora_A=A, lora_B=B, scale=scale) computes."""
    out_f, in_f = state.shape
    g = in_f // state.group_size
    if lora_A.dim() != 2 or lora_A.shape[1] != g or lora_B.shape != (out_f, lora_A.shape[0]):
        raise ValueError(f"int4_merge_lora: needs lora_A (r, in/group_size={g}) and lora_B (out={out_f}, r), got "
                         f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}; a LoRA on the full input does not "
                         "merge into the zero points")
    return reference.int4_merge_lora(state.zeros, lora_A.detach(), lora_B.detach(), scale, state.group_size)


extension()  # load lorabench._C when it is built: it registers the compiled CPU/CUDA kernels
