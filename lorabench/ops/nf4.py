"""NF4 (4-bit NormalFloat) quantized weights and the fused NF4 linear + LoRA of QLoRA (arXiv 2305.14314).

Scope: the op schemas in the `lorabench` namespace, their fakes, the reference fallback, the autograd
Function and the public functions. Sources: QLoRA sec. 3 (NF4, double quantization, eq. (5) for the
LoRA forward); bitsandbytes (its NF4 layout is the contract, see below).

Ops:

    nf4_quantize(W, blocksize)                         -> (packed, absmax)
    nf4_dequantize(packed, absmax, absmax2, code2, offset, shape, blocksize, dtype) -> W
    nf4_linear(x, packed, absmax, absmax2, code2, offset, out_features, blocksize, bias, A, B, s)
                                                       -> y = x W^T + b + s (x A^T) B^T

Layout, bit-compatible with bitsandbytes' quantize_4bit(quant_type="nf4"): the weight is flattened
row-major and cut into blocks of `blocksize` consecutive elements (the last one may be partial; for a
linear layer whose in_features is a multiple of the block size a block never straddles rows);
element 2i of the flattened weight is the HIGH nibble of byte i (an odd count pads the last low
nibble with code 7, the NF4 zero); absmax is one fp32 per block. With double quantization
(`double_quant=True`, bitsandbytes' compress_statistics) absmax is stored as uint8 codes of the
dynamic 8-bit map for (absmax - offset), offset = mean(absmax), with one fp32 second-level absmax
(absmax2) per 256 codes: absmax_i = code2[q_i] * absmax2[i // 256] + offset.

Backends: the compiled CPU kernels (csrc/cpu/nf4*.cpp, bound in csrc/quant_ops.cpp) and CUDA kernels
(csrc/cuda/nf4_int4.cu) register for the CPU and CUDA keys; the references in reference.py are the
CompositeExplicitAutograd fallback. The base weight is frozen: gradients flow to x, the LoRA factors
and the bias, never to the quantized weight (QLoRA).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from lorabench.ops import reference
from lorabench.ops._backend import autocast_dtype, cast_to, extension

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes accepts these
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
NESTED_BLOCKSIZE = 256  # double quantization: 256 absmax per second-level scale (QLoRA sec. 3)

_lib = torch.library.Library("lorabench", "FRAGMENT")
_lib.define("nf4_quantize(Tensor weight, int blocksize) -> (Tensor, Tensor)")
_lib.define(
    "nf4_dequantize(Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, Tensor? offset, "
    "SymInt[] shape, int blocksize, ScalarType dtype) -> Tensor"
)
_lib.define(
    "nf4_linear(Tensor x, Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, Tensor? offset, "
    "SymInt out_features, int blocksize, Tensor? bias, Tensor? lora_A, Tensor? lora_B, float scale) -> Tensor"
)


# --- checks shared by the fakes and the public functions ---------------------------------------

def _check_state(packed, absmax, absmax2, code2, offset, numel, blocksize, op):
    torch._check(blocksize in BLOCKSIZES, lambda: f"{op}: blocksize {blocksize} is not one of {BLOCKSIZES}")
    torch._check(packed.dtype == torch.uint8 and packed.dim() == 1,
                 lambda: f"{op}: packed must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    torch._check(packed.numel() == (numel + 1) // 2,
                 lambda: f"{op}: packed holds {packed.numel()} bytes but a weight of {numel} elements needs "
                         f"{(numel + 1) // 2}")
    blocks = -(-numel // blocksize)
    torch._check(absmax.dim() == 1 and absmax.numel() == blocks,
                 lambda: f"{op}: absmax must be ({blocks},) for {numel} elements in blocks of {blocksize}, "
                         f"got {tuple(absmax.shape)}")
    if absmax.dtype == torch.uint8:  # double quantization
        torch._check(absmax2 is not None and code2 is not None and offset is not None,
                     lambda: f"{op}: uint8 absmax (double quantization) needs absmax2, code2 and offset")
        n2 = -(-blocks // NESTED_BLOCKSIZE)
        torch._check(absmax2.dtype == torch.float32 and tuple(absmax2.shape) == (n2,),
                     lambda: f"{op}: absmax2 must be float32 ({n2},), got {absmax2.dtype} {tuple(absmax2.shape)}")
        torch._check(code2.dtype == torch.float32 and tuple(code2.shape) == (256,),
                     lambda: f"{op}: code2 must be the float32 (256,) dynamic code book")
        torch._check(offset.dtype == torch.float32 and offset.numel() == 1,
                     lambda: f"{op}: offset must be a float32 scalar tensor")
    else:
        torch._check(absmax.dtype == torch.float32,
                     lambda: f"{op}: absmax must be float32 (or uint8 with double quantization), got {absmax.dtype}")


def _check_lora(x, lora_A, lora_B, in_f, out_f, op, pooled_in=None):
    if lora_A is None and lora_B is None:
        return
    torch._check(lora_A is not None and lora_B is not None, lambda: f"{op}: give both lora_A and lora_B or neither")
    ok_in = (in_f,) if pooled_in is None else (in_f, pooled_in)
    torch._check(lora_A.dim() == 2 and lora_A.shape[1] in ok_in,
                 lambda: f"{op}: lora_A must be (r, in) with in in {ok_in}, got {tuple(lora_A.shape)}")
    torch._check(lora_B.dim() == 2 and tuple(lora_B.shape) == (out_f, lora_A.shape[0]),
                 lambda: f"{op}: lora_B must be (out={out_f}, r={lora_A.shape[0]}), got {tuple(lora_B.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        torch._check(t.dtype == x.dtype, lambda: f"{op}: {name}.dtype {t.dtype} differs from x.dtype {x.dtype}")


def _check_x_bias(x, bias, in_f, out_f, op):
    torch._check(x.dim() == 2, lambda: f"{op}: x must be (tokens, in) here, got shape {tuple(x.shape)}")
    torch._check(x.dtype in ACT_DTYPES, lambda: f"{op}: x.dtype {x.dtype} is not supported; use one of {ACT_DTYPES}")
    torch._check(x.shape[1] == in_f, lambda: f"{op}: x has {x.shape[1]} features, the weight has in={in_f}")
    if bias is not None:
        torch._check(tuple(bias.shape) == (out_f,) and bias.dtype == x.dtype,
                     lambda: f"{op}: bias must be ({out_f},) of x.dtype {x.dtype}, got {bias.dtype} {tuple(bias.shape)}")


@torch.library.register_fake("lorabench::nf4_quantize", lib=_lib)
def _nf4_quantize_fake(weight, blocksize):
    torch._check(blocksize in BLOCKSIZES, lambda: f"nf4_quantize: blocksize {blocksize} is not one of {BLOCKSIZES}")
    n = weight.numel()
    return (weight.new_empty((n + 1) // 2, dtype=torch.uint8),
            weight.new_empty(-(-n // blocksize), dtype=torch.float32))


@torch.library.register_fake("lorabench::nf4_dequantize", lib=_lib)
def _nf4_dequantize_fake(packed, absmax, absmax2, code2, offset, shape, blocksize, dtype):
    _check_state(packed, absmax, absmax2, code2, offset, math.prod(shape), blocksize, "nf4_dequantize")
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_fake("lorabench::nf4_linear", lib=_lib)
def _nf4_linear_fake(x, packed, absmax, absmax2, code2, offset, out_features, blocksize, bias, lora_A, lora_B, scale):
    in_f = x.shape[1]
    _check_state(packed, absmax, absmax2, code2, offset, out_features * in_f, blocksize, "nf4_linear")
    _check_x_bias(x, bias, in_f, out_features, "nf4_linear")
    _check_lora(x, lora_A, lora_B, in_f, out_features, "nf4_linear")
    return x.new_empty(x.shape[0], out_features)


# --- the reference kernels: the fallback for every device without a compiled kernel ------------

@torch.library.impl(_lib, "nf4_quantize", "CompositeExplicitAutograd")
def _nf4_quantize_ref(weight, blocksize):
    return reference.nf4_quantize(weight, blocksize)


@torch.library.impl(_lib, "nf4_dequantize", "CompositeExplicitAutograd")
def _nf4_dequantize_ref(packed, absmax, absmax2, code2, offset, shape, blocksize, dtype):
    return reference.nf4_dequantize(packed, absmax, absmax2, code2, offset, shape, blocksize, dtype)


@torch.library.impl(_lib, "nf4_linear", "CompositeExplicitAutograd")
def _nf4_linear_ref(x, packed, absmax, absmax2, code2, offset, out_features, blocksize, bias, lora_A, lora_B, scale):
    w = reference.nf4_dequantize(packed, absmax, absmax2, code2, offset, (out_features, x.shape[1]), blocksize,
                                 torch.float32)
    return reference.quantized_lora_linear(x, w, bias, lora_A, lora_B, scale)


# --- the quantized weight ------------------------------------------------------------------------

@dataclasses.dataclass
class NF4Weight:
    """A weight in NF4: the tensors of bitsandbytes' QuantState (see the module docstring).

    absmax is fp32 (blocks,), or uint8 (blocks,) codes when double-quantized, then with absmax2
    (ceil(blocks / 256),) fp32, code2 the (256,) dynamic code book and offset a fp32 scalar tensor."""
    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    blocksize: int = 64
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    def tensors(self):
        return self.packed, self.absmax, self.absmax2, self.code2, self.offset


_DYNAMIC_CODE = reference.dynamic_code()


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize `weight` (any shape, fp32/bf16/fp16) to NF4 in bitsandbytes' layout (QLoRA sec. 3).

    Packed bytes and fp32 absmax equal bitsandbytes' quantize_4bit bit for bit. Double quantization
    (QLoRA sec. 3, "Double Quantization") stores absmax - mean in 8 bits per block of 256 with the
    nearest dynamic code (bitsandbytes' CPU search picks the farther of two codes for ~0.2% of values
    within a hair of a midpoint; see docs/kernels.md)."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"nf4_quantize: blocksize {blocksize} is not one of {BLOCKSIZES}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"nf4_quantize: weight.dtype {weight.dtype} is not supported; use float32, bfloat16 or float16")
    if weight.numel() == 0:
        raise ValueError("nf4_quantize: the weight is empty")
    packed, absmax = torch.ops.lorabench.nf4_quantize(weight.detach().contiguous(), blocksize)
    state = NF4Weight(packed, absmax, tuple(weight.shape), blocksize)
    if double_quant:
        offset = absmax.mean()  # sec. 3 of QLoRA: the absmax are positive, center them for a symmetric code
        code2 = _DYNAMIC_CODE.to(absmax.device)
        state.absmax, state.absmax2 = reference.quantize_blockwise8(absmax - offset, code2, NESTED_BLOCKSIZE)
        state.code2, state.offset = code2, offset
    return state


def nf4_dequantize(state: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight NF4[q] * absmax (fp32, then cast to dtype), as bitsandbytes' dequantize_4bit."""
    return torch.ops.lorabench.nf4_dequantize(*state.tensors(), list(state.shape), state.blocksize, dtype)


class QuantLinearFunction(torch.autograd.Function):
    """y = op(x, *weight_tensors, ..., bias, A, B, s); gradients for x, bias, A, B (the base is frozen).
    The autograd of the reference fallback when the extension is not built (with it: the C++ twin in
    csrc/quant_ops.cpp).

    `dequantize()` returns the dense weight for dx = dy W (QLoRA: the gradient flows through the
    dequantized frozen weight into the adapters). `pool` > 1: A acts on x averaged over groups of
    `pool` inputs (QA-LoRA)."""

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, scale, pool, op, dequantize, *weight_args):
        ctx.save_for_backward(x, lora_A, lora_B)
        ctx.scale, ctx.pool, ctx.dequantize, ctx.has_bias = scale, pool, dequantize, bias is not None
        ctx.n_weight_args = len(weight_args)
        return op(x, *weight_args, bias, lora_A, lora_B, scale)

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_A, lora_B = ctx.saved_tensors
        need_x, need_b, need_a, need_bb = ctx.needs_input_grad[:4]
        dx = d_bias = d_a = d_b = None
        if need_x:
            dx = grad_y @ ctx.dequantize(grad_y.dtype)  # (tokens, in)
        if lora_A is not None:
            xp = x if ctx.pool == 1 else x.reshape(x.shape[0], x.shape[1] // ctx.pool, ctx.pool).mean(-1)  # (tokens, in/pool)
            dxa = ctx.scale * (grad_y @ lora_B)  # (tokens, r)
            if need_bb:
                d_b = ctx.scale * (grad_y.T @ (xp @ lora_A.T))  # (out, r)
            if need_a:
                d_a = dxa.T @ xp  # (r, in/pool)
            if need_x:
                dxp = dxa @ lora_A  # (tokens, in/pool)
                dx = dx + (dxp if ctx.pool == 1 else (dxp / ctx.pool).repeat_interleave(ctx.pool, dim=1))
        if need_b and ctx.has_bias:
            d_bias = grad_y.sum(0)
        return (dx, d_bias, d_a, d_b, None, None, None, None) + (None,) * ctx.n_weight_args


def python_autograd(x2, bias, lora_A, lora_B) -> bool:
    """Whether the call needs QuantLinearFunction: grad mode on, an input that requires grad, and no compiled
    extension (with it, the ops carry C++ autograd kernels, csrc/quant_ops.cpp, the same math: a Python
    autograd.Function costs more than a batch-1 GEMV on a small layer)."""
    return torch.is_grad_enabled() and (x2.requires_grad or (bias is not None and bias.requires_grad)
                                        or (lora_A is not None and lora_A.requires_grad)
                                        or (lora_B is not None and lora_B.requires_grad)) and extension() is None


_NF4_LINEAR = torch.ops.lorabench.nf4_linear.default


def nf4_linear_tensors(x, packed, absmax, absmax2, code2, offset, shape, blocksize, bias=None, lora_A=None,
                       lora_B=None, scale=1.0):
    """nf4_linear on the tensors of an NF4Weight (no NF4Weight built): the body of nf4_linear and of
    NF4Linear.forward. Without autograd this is one check and the op call (the per-call cost of a
    batch-1 GEMV on a small layer is this wrapper, see docs/kernels.md)."""
    out_f, in_f = shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"nf4_linear: x must be (..., in={in_f}), got shape {tuple(x.shape)}")
    if (dt := autocast_dtype(x)) is not None:   # under autocast: x, bias and the factors in its dtype, as F.linear,
        x, bias, lora_A, lora_B = cast_to(dt, x, bias, lora_A, lora_B)   # the op itself with autocast off
        with torch.autocast(x.device.type, enabled=False):
            return nf4_linear_tensors(x, packed, absmax, absmax2, code2, offset, shape, blocksize, bias, lora_A,
                                      lora_B, scale)
    x2 = x if x.dim() == 2 else x.reshape(-1, in_f)
    if python_autograd(x2, bias, lora_A, lora_B):
        state = NF4Weight(packed, absmax, (out_f, in_f), blocksize, absmax2, code2, offset)
        fn = lambda x2, *w_and_rest: _NF4_LINEAR(x2, *w_and_rest[:5], out_f, blocksize, *w_and_rest[5:])  # noqa: E731
        y = QuantLinearFunction.apply(x2, bias, lora_A, lora_B, float(scale), 1, fn,
                                      lambda dt: nf4_dequantize(state, dt), packed, absmax, absmax2, code2, offset)
    else:
        y = _NF4_LINEAR(x2, packed, absmax, absmax2, code2, offset, out_f, blocksize, bias, lora_A, lora_B,
                        float(scale))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_f)


def nf4_linear(x: torch.Tensor, state: NF4Weight, bias: torch.Tensor | None = None,
               lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None,
               scale: float = 1.0) -> torch.Tensor:
    """y = x W^T + b + scale (x A^T) B^T with W = NF4 dequantized (QLoRA eq. (5), without dropout).

    x: (..., in) fp32/bf16/fp16 (fp64 for gradcheck); state: NF4Weight of shape (out, in); lora_A (r, in)
    and lora_B (out, r) in x.dtype, or both None. The CPU kernel streams the packed weight once for
    small batches and dequantizes tiles into a GEMM for large ones."""
    if len(state.shape) != 2:
        raise ValueError(f"nf4_linear: the quantized weight must be 2-D (out, in), got shape {state.shape}")
    return nf4_linear_tensors(x, state.packed, state.absmax, state.absmax2, state.code2, state.offset, state.shape,
                              state.blocksize, bias, lora_A, lora_B, scale)


extension()  # load lorabench._C when it is built: it registers the compiled CPU/CUDA kernels
