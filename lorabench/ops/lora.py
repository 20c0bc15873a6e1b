"""Fused LoRA linear (arXiv 2106.09685) and DoRA linear (arXiv 2402.09353) as torch custom ops.

Scope: the op schemas in the `lorabench` namespace, their fake (meta) implementations that check
shapes and dtypes, the reference implementation registered as the fallback kernel, one autograd
Function per op and the public functions `lora_linear` / `dora_linear`.

Ops (x is flattened to (tokens, in) before the op; weight and bias are frozen):

    lora_linear(x, W, b, A, B, s, mask)           -> (y, xa)          y = x W^T + b + s (x_d A^T) B^T
    lora_linear_backward(dy, x, W, A, B, xa, s, mask, need_dx) -> (dx, dA, dB)
    dora_linear(x, W, b, A, B, m, s, mask)        -> (y, xa, u, norm) y = W x + b + (g-1) W x_d + g s B A x_d
    dora_linear_backward(dy, x, W, A, B, m, xa, u, norm, s, mask, need_dx) -> (dx, dA, dB, dm)

with x_d = x * mask (mask holds 0 or 1/(1-p); None means no dropout), xa = x_d A^T (tokens, r),
saved by the forward so the backward never recomputes it, u = x_d W^T + s xa B^T and
g = m / ||W + s B A||_c (fp32, fp64 for fp64 inputs; detached: sec. 4.3 of DoRA). Neither op materialises W + s B A.

Backends: the compiled CPU kernels (csrc/cpu/lora_linear.cpp) and CUDA kernels (csrc/cuda/lora.cu)
register for the CPU and CUDA keys; the reference below is registered as CompositeExplicitAutograd,
which the dispatcher uses for any device without a compiled kernel (extension not built).
"""
from __future__ import annotations

import torch

from lorabench.ops import reference
from lorabench.ops._backend import autocast_dtype, cast_to, extension

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KERNELS = ("fused", "reference")

_lib = torch.library.Library("lorabench", "FRAGMENT")
_lib.define(
    "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
    "Tensor? dropout_mask) -> (Tensor, Tensor)"
)
_lib.define(
    "lora_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
    "Tensor xa, float scale, Tensor? dropout_mask, bool need_dx) -> (Tensor, Tensor, Tensor)"
)
_lib.define(
    "dora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
    "Tensor magnitude, float scale, Tensor? dropout_mask) -> (Tensor, Tensor, Tensor, Tensor)"
)
_lib.define(
    "dora_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
    "Tensor magnitude, Tensor xa, Tensor u, Tensor weight_norm, float scale, Tensor? dropout_mask, "
    "bool need_dx) -> (Tensor, Tensor, Tensor, Tensor)"
)


# --- shape and dtype checks (shared by the fakes and the public functions) ---------------------

def _acc_dtype(dtype):
    """Accumulation dtype of the DoRA norm: float32, float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(x, weight, bias, lora_A, lora_B, dropout_mask, magnitude=None, op="lora_linear"):
    torch._check(x.dim() == 2, lambda: f"{op}: x must be (tokens, in) here, got shape {tuple(x.shape)}")
    torch._check(x.dtype in _DTYPES, lambda: f"{op}: x.dtype {x.dtype} is not supported; use one of {_DTYPES}")
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be (out, in), got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    torch._check(x.shape[1] == in_f, lambda: f"{op}: x has {x.shape[1]} features but weight is (out={out_f}, in={in_f})")
    torch._check(lora_A.dim() == 2 and lora_A.shape[1] == in_f,
                 lambda: f"{op}: lora_A must be (r, in={in_f}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    torch._check(r >= 1, lambda: f"{op}: the rank r = lora_A.shape[0] must be >= 1")
    torch._check(tuple(lora_B.shape) == (out_f, r),
                 lambda: f"{op}: lora_B must be (out={out_f}, r={r}), got {tuple(lora_B.shape)}")
    named = [("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        torch._check(tuple(bias.shape) == (out_f,), lambda: f"{op}: bias must be (out={out_f},), got {tuple(bias.shape)}")
        named.append(("bias", bias))
    if magnitude is not None:
        torch._check(tuple(magnitude.shape) == (out_f,),
                     lambda: f"{op}: magnitude must be (out={out_f},), got {tuple(magnitude.shape)}")
        named.append(("magnitude", magnitude))
    if dropout_mask is not None:
        torch._check(dropout_mask.shape == x.shape,
                     lambda: f"{op}: dropout_mask must have the shape of x {tuple(x.shape)}, got {tuple(dropout_mask.shape)}")
        named.append(("dropout_mask", dropout_mask))
    for name, t in named:
        torch._check(t.dtype == x.dtype, lambda: f"{op}: {name}.dtype is {t.dtype} but x.dtype is {x.dtype}; cast them to one dtype")
        torch._check(t.device == x.device, lambda: f"{op}: {name} is on {t.device} but x is on {x.device}")


@torch.library.register_fake("lorabench::lora_linear", lib=_lib)
def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scale, dropout_mask):
    _check(x, weight, bias, lora_A, lora_B, dropout_mask)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.register_fake("lorabench::lora_linear_backward", lib=_lib)
def _lora_linear_backward_fake(grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_mask, need_dx):
    _check(x, weight, None, lora_A, lora_B, dropout_mask, op="lora_linear_backward")
    torch._check(grad_y.shape == (x.shape[0], weight.shape[0]), lambda: "lora_linear_backward: grad_y must be (tokens, out)")
    torch._check(xa.shape == (x.shape[0], lora_A.shape[0]), lambda: "lora_linear_backward: xa must be (tokens, r)")
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


@torch.library.register_fake("lorabench::dora_linear", lib=_lib)
def _dora_linear_fake(x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_mask):
    _check(x, weight, bias, lora_A, lora_B, dropout_mask, magnitude, op="dora_linear")
    tokens, out_f = x.shape[0], weight.shape[0]
    return (x.new_empty(tokens, out_f), x.new_empty(tokens, lora_A.shape[0]), x.new_empty(tokens, out_f),
            x.new_empty(out_f, dtype=_acc_dtype(x.dtype)))


@torch.library.register_fake("lorabench::dora_linear_backward", lib=_lib)
def _dora_linear_backward_fake(grad_y, x, weight, lora_A, lora_B, magnitude, xa, u, weight_norm, scale,
                               dropout_mask, need_dx):
    _check(x, weight, None, lora_A, lora_B, dropout_mask, magnitude, op="dora_linear_backward")
    torch._check(weight_norm.dtype == _acc_dtype(x.dtype),
                 lambda: f"dora_linear_backward: weight_norm must be {_acc_dtype(x.dtype)} for x.dtype {x.dtype}")
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape), magnitude.new_empty(magnitude.shape)


# --- the reference kernels: the fallback for every device without a compiled kernel ------------

def _drop(x, dropout_mask):
    return x if dropout_mask is None else x * dropout_mask


@torch.library.impl(_lib, "lora_linear", "CompositeExplicitAutograd")
def _lora_linear_ref(x, weight, bias, lora_A, lora_B, scale, dropout_mask):
    xa = _drop(x, dropout_mask) @ lora_A.T  # (tokens, r), saved for the backward
    y = torch.nn.functional.linear(x, weight, bias)
    return y.addmm_(xa, lora_B.T, alpha=scale), xa


@torch.library.impl(_lib, "lora_linear_backward", "CompositeExplicitAutograd")
def _lora_linear_backward_ref(grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_mask, need_dx):
    dxa = scale * (grad_y @ lora_B)  # (tokens, r)
    d_b = scale * (grad_y.T @ xa)  # (out, r)
    d_a = dxa.T @ _drop(x, dropout_mask)  # (r, in)
    if not need_dx:
        return x.new_empty(0), d_a, d_b
    dx = _drop(dxa @ lora_A, dropout_mask) + grad_y @ weight  # (tokens, in)
    return dx, d_a, d_b


def _dora_norm(weight, lora_A, lora_B, scale, cancellation=0.5):
    """||W + s B A||_c per row without materialising W + s B A (acc dtype):
    ||W_j||^2 + 2 s <W_j, (BA)_j> + s^2 ||(BA)_j||^2, with <W_j, (BA)_j> = sum_k (W A^T)_jk B_jk
    and ||(BA)_j||^2 = B_j (A A^T) B_j^T. Rows where the sum cancels (under `cancellation` x its
    positive terms) are recomputed from the formed rows W_j + s B_j A (those rows only)."""
    acc = _acc_dtype(weight.dtype)
    a, b = lora_A.to(acc), lora_B.to(acc)
    w_sq = torch.linalg.vector_norm(weight, dim=1, dtype=acc).square()  # (out,)
    wa = weight.to(acc) @ a.T  # (out, r); the fallback converts W whole, the kernels by row chunks
    ba_sq = (b * (b @ (a @ a.T))).sum(1)  # (out,)
    sq = w_sq + 2 * scale * (b * wa).sum(1) + scale * scale * ba_sq
    bad = sq < cancellation * (w_sq + scale * scale * ba_sq)
    if bad.any():
        sq[bad] = torch.linalg.vector_norm(weight[bad].to(acc) + scale * b[bad] @ a, dim=1).square()
    return sq.clamp_min(0).sqrt()


@torch.library.impl(_lib, "dora_linear", "CompositeExplicitAutograd")
def _dora_linear_ref(x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_mask):
    norm = _dora_norm(weight, lora_A, lora_B, scale)  # (out,) fp32
    g = magnitude.to(norm.dtype) / norm  # eq. (5) of DoRA: m / ||W + s B A||_c, in the acc dtype
    x_drop = _drop(x, dropout_mask)
    xa = x_drop @ lora_A.T  # (tokens, r)
    u = (x_drop @ weight.T).addmm_(xa, lora_B.T, alpha=scale)  # (tokens, out)
    y = (g * u.to(g.dtype)).to(x.dtype)  # one rounding, as the kernels' epilogue
    if dropout_mask is not None:  # base path without dropout, as in PEFT
        y += x @ weight.T - x_drop @ weight.T
    if bias is not None:
        y += bias
    return y, xa, u, norm


@torch.library.impl(_lib, "dora_linear_backward", "CompositeExplicitAutograd")
def _dora_linear_backward_ref(grad_y, x, weight, lora_A, lora_B, magnitude, xa, u, weight_norm, scale,
                              dropout_mask, need_dx):
    acc = weight_norm.dtype
    g = magnitude.to(acc) / weight_norm
    d_m = ((grad_y.to(acc) * u.to(acc)).sum(0) / weight_norm).to(magnitude.dtype)  # d y / d m = u / n
    du = (grad_y.to(acc) * g).to(grad_y.dtype)  # (tokens, out)
    dxa = scale * (du @ lora_B)  # (tokens, r)
    d_b = scale * (du.T @ xa)
    d_a = dxa.T @ _drop(x, dropout_mask)
    if not need_dx:
        return x.new_empty(0), d_a, d_b, d_m
    if dropout_mask is None:
        dx = du @ weight + dxa @ lora_A
    else:
        dx = grad_y @ weight + ((du - grad_y) @ weight + dxa @ lora_A) * dropout_mask
    return dx, d_a, d_b, d_m


# --- autograd ---------------------------------------------------------------------------------
# With the extension built, the ops carry C++ autograd kernels (csrc/lora_ops.cpp, the same math):
# a Python autograd.Function costs more than the whole op at a few tokens. These Python Functions
# are the autograd of the reference fallback, when the extension is not built.

def _python_autograd() -> bool:
    return extension() is None


class LoraLinearFunction(torch.autograd.Function):
    """Gradients for x, lora_A, lora_B; weight and bias are frozen (the public function checks)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout_mask):
        y, xa = torch.ops.lorabench.lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_mask)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, dropout_mask)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, xa, dropout_mask = ctx.saved_tensors
        dx, d_a, d_b = torch.ops.lorabench.lora_linear_backward(
            grad_y, x, weight, lora_A, lora_B, xa, ctx.scale, dropout_mask, ctx.needs_input_grad[0])
        return (dx if ctx.needs_input_grad[0] else None, None, None, d_a, d_b, None, None)


class DoraLinearFunction(torch.autograd.Function):
    """Gradients for x, lora_A, lora_B, magnitude; the norm is a constant (sec. 4.3 of DoRA)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_mask):
        y, xa, u, norm = torch.ops.lorabench.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scale,
                                                         dropout_mask)
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, xa, u, norm, dropout_mask)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, magnitude, xa, u, norm, dropout_mask = ctx.saved_tensors
        dx, d_a, d_b, d_m = torch.ops.lorabench.dora_linear_backward(
            grad_y, x, weight, lora_A, lora_B, magnitude, xa, u, norm, ctx.scale, dropout_mask,
            ctx.needs_input_grad[0])
        return (dx if ctx.needs_input_grad[0] else None, None, None, d_a, d_b, d_m, None, None)


# --- public functions -------------------------------------------------------------------------

def dropout_mask(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The inverted-dropout mask of F.dropout: 0 with probability p, else 1/(1-p); the shape of x."""
    keep = 1.0 - p
    return torch.empty_like(x).bernoulli_(keep, generator=generator).div_(keep)


def _inputs_ok(x, weight, bias, lora_A, lora_B, magnitude) -> bool:
    """The checks of _check as one fast expression (per-call overhead matters at a few tokens)."""
    if not (x.dim() == weight.dim() == lora_A.dim() == lora_B.dim() == 2 and x.dtype in _DTYPES):
        return False
    (out_f, in_f), (r, a_in), (b_out, b_r) = weight.shape, lora_A.shape, lora_B.shape
    tensors = [t for t in (weight, bias, lora_A, lora_B, magnitude) if t is not None]
    return (x.shape[1] == in_f == a_in and out_f == b_out and r == b_r >= 1
            and (bias is None or bias.shape == (out_f,)) and (magnitude is None or magnitude.shape == (out_f,))
            and all(t.dtype == x.dtype and t.device == x.device for t in tensors))


def _prepare(x, weight, bias, lora_A, lora_B, dropout_p, training, kernel, generator, op, magnitude=None):
    if kernel not in KERNELS:
        raise ValueError(f"{op}: unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"{op}: x must be (..., in={weight.shape[-1]}), got shape {tuple(x.shape)}")
    frozen = [n for n, t in (("weight", weight), ("bias", bias)) if t is not None and t.requires_grad]
    if kernel == "fused" and frozen and torch.is_grad_enabled():
        raise ValueError(f"{op}: kernel='fused' treats the base layer as frozen, but {' and '.join(frozen)} "
                         "requires grad; freeze it (requires_grad_(False)) or use kernel='reference'")
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (tokens, in); a view costs an autograd node
    if not _inputs_ok(x2, weight, bias, lora_A, lora_B, magnitude):  # the compiled kernels trust their
        try:                                                          # inputs: explain with the fake's checks
            _check(x2, weight, bias, lora_A, lora_B, None, magnitude, op=op)
        except RuntimeError as e:
            raise ValueError(str(e)) from None
    mask = dropout_mask(x2, dropout_p, generator) if training and dropout_p > 0 else None
    return x2, mask


def lora_linear(x, weight, bias, lora_A, lora_B, scale: float, dropout_p: float = 0.0, training: bool = False,
                kernel: str = "fused", *, generator: torch.Generator | None = None) -> torch.Tensor:
    """y = x W^T + b + scale * (dropout(x) A^T) B^T (eq. (3) of LoRA, arXiv 2106.09685).

    x: (..., in); weight: (out, in), frozen; bias: (out,) or None, frozen; lora_A: (r, in);
    lora_B: (out, r). kernel="fused" runs the lorabench::lora_linear op (compiled C++/CUDA, or the
    reference registered as its fallback when the extension is not built) with gradients for x,
    lora_A and lora_B; kernel="reference" is plain PyTorch autograd through reference.lora_linear.
    The dropout mask is drawn once (from `generator` when given) and used by forward and backward.
    """
    if kernel == "fused" and (dt := autocast_dtype(x)) is not None:  # under autocast the op runs as F.linear would:
        with torch.autocast(x.device.type, enabled=False):          # in autocast's dtype, with autocast off inside
            return lora_linear(*cast_to(dt, x, weight, bias, lora_A, lora_B), scale, dropout_p, training, kernel,
                               generator=generator)
    x2, mask = _prepare(x, weight, bias, lora_A, lora_B, dropout_p, training, kernel, generator, "lora_linear")
    if kernel == "reference":
        y = reference.lora_linear(x2, weight, bias, lora_A, lora_B, scale, mask)
    elif _python_autograd() and torch.is_grad_enabled() and (x2.requires_grad or lora_A.requires_grad
                                                             or lora_B.requires_grad):
        y = LoraLinearFunction.apply(x2, weight, bias, lora_A, lora_B, float(scale), mask)
    else:  # the op (with the extension, its autograd kernel is the C++ twin of LoraLinearFunction)
        y = torch.ops.lorabench.lora_linear(x2, weight, bias, lora_A, lora_B, float(scale), mask)[0]
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scale: float, dropout_p: float = 0.0,
                training: bool = False, kernel: str = "fused", *,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DoRA, eq. (5) of arXiv 2402.09353: y = m * (W + s B A) x / ||W + s B A||_c + b.

    The norm is taken per output row (PEFT's convention, `||W + s*B@A||` over dim=1) and detached
    (sec. 4.3). With dropout the base path sees x and the DoRA path dropout(x), as in PEFT's
    DoraLinearLayer. magnitude: (out,). Gradients for x, lora_A, lora_B and magnitude.
    """
    if kernel == "fused" and (dt := autocast_dtype(x)) is not None:  # as lora_linear; the norm accumulates in fp32
        with torch.autocast(x.device.type, enabled=False):
            return dora_linear(*cast_to(dt, x, weight, bias, lora_A, lora_B, magnitude), scale, dropout_p, training,
                               kernel, generator=generator)
    x2, mask = _prepare(x, weight, bias, lora_A, lora_B, dropout_p, training, kernel, generator, "dora_linear",
                       magnitude)
    if kernel == "reference":
        y = reference.dora_linear(x2, weight, bias, lora_A, lora_B, magnitude, scale, mask)
    elif _python_autograd() and torch.is_grad_enabled() and any(
            t.requires_grad for t in (x2, lora_A, lora_B, magnitude)):
        y = DoraLinearFunction.apply(x2, weight, bias, lora_A, lora_B, magnitude, float(scale), mask)
    else:
        y = torch.ops.lorabench.dora_linear(x2, weight, bias, lora_A, lora_B, magnitude, float(scale), mask)[0]
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


extension()  # load lorabench._C when it is built: it registers the compiled CPU/CUDA kernels
