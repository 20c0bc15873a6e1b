"""Multi-adapter LoRA ops: BGMV (one adapter per token, decode) and SGMV (one adapter per segment
of contiguous tokens, prefill), after Punica (arXiv 2310.18547) and S-LoRA (arXiv 2311.03285).

A batch mixes requests of many adapters; the LoRA term of eq. (3) of LoRA (arXiv 2106.09685),
`h = W0 x + s B A x`, is computed per token with that token's adapter:

    shrink:  y[i] = s[l] * x[i] A[l]^T        l = idx[i]   (y: (T, R), fp32)
    expand:  out[i] += y[i] B[l]^T

Weight layout (heterogeneous ranks, no padding rule): the adapters resident in fast memory are
stacked in slots, `A: (L, R, in)` and `B: (L, out, R)`, with a per-slot rank `ranks: (L,)` and scale
`scales: (L,)` (fp32). Slot l holds an adapter of rank r = ranks[l] <= R in `A[l, :r]` and
`B[l, :, :r]`; rows of A and columns of B past r are never read (they may hold anything, even NaN),
and `y[i, r:]` is written as zero, so the result never depends on what a slot is padded with.
`idx[i] = -1` means "no adapter": y[i] = 0 and out[i] is left as it is.

SGMV takes the same slots with `seg_starts: (S+1,)` (0 = seg_starts[0] <= ... <= seg_starts[S] = T)
and `seg_idx: (S,)`: tokens seg_starts[s]:seg_starts[s+1] all use slot seg_idx[s]. It equals BGMV
with `idx = seg_idx.repeat_interleave(diff(seg_starts))` (that is its reference).

dtypes: x, A, B, out in fp32, bf16 or fp16 (all the same); y is fp32 (the low-rank activation is
kept in fp32 between shrink and expand, as vLLM does); idx, seg_*, ranks are int64.
Backends: `reference` (pure PyTorch, always), `cpu` (lorabench._C), `cuda` (lorabench._C built with
CUDA). These are inference ops (no autograd): serving never trains the adapters. Training many adapters
at once (the cross-task library) gives them a backward built from the same ops: `SgmvLoRA` in
lorabench/harness/multitask.py.
"""
from __future__ import annotations

import functools

import torch

from lorabench.ops import reference
from lorabench.ops._backend import available_backends

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)

torch.library.define(
    "lorabench::bgmv_shrink",
    "(Tensor x, Tensor A, Tensor idx, Tensor ranks, Tensor scales) -> Tensor",
)
torch.library.define(
    "lorabench::bgmv_expand",
    "(Tensor(a!) out, Tensor y, Tensor B, Tensor idx, Tensor ranks) -> ()",
)
torch.library.define(
    "lorabench::sgmv_shrink",
    "(Tensor x, Tensor A, Tensor seg_starts, Tensor seg_idx, Tensor ranks, Tensor scales) -> Tensor",
)
torch.library.define(
    "lorabench::sgmv_expand",
    "(Tensor(a!) out, Tensor y, Tensor B, Tensor seg_starts, Tensor seg_idx, Tensor ranks) -> ()",
)


def _check_slots(name, W, ranks, scales=None):
    torch._check(W.dim() == 3, lambda: f"{name}: adapter weights must be 3-D (slots, ...), got {tuple(W.shape)}")
    torch._check(W.dtype in _FLOATS, lambda: f"{name}: weights must be fp32/bf16/fp16, got {W.dtype}")
    L = W.shape[0]
    torch._check(ranks.dtype == torch.int64 and tuple(ranks.shape) == (L,),
                 lambda: f"{name}: ranks must be int64 of shape ({L},) (one per slot), got "
                         f"{ranks.dtype} {tuple(ranks.shape)}")
    if scales is not None:
        torch._check(scales.dtype == torch.float32 and tuple(scales.shape) == (L,),
                     lambda: f"{name}: scales must be float32 of shape ({L},) (one per slot), got "
                             f"{scales.dtype} {tuple(scales.shape)}")


def _check_tokens(name, T, idx):
    torch._check(idx.dtype == torch.int64 and tuple(idx.shape) == (T,),
                 lambda: f"{name}: idx must be int64 of shape ({T},) (one slot per token, -1 = none), "
                         f"got {idx.dtype} {tuple(idx.shape)}")


def _check_segments(name, seg_starts, seg_idx):
    torch._check(seg_starts.dtype == torch.int64 and seg_starts.dim() == 1 and seg_starts.shape[0] >= 1,
                 lambda: f"{name}: seg_starts must be 1-D int64 of length S+1 >= 1, got "
                         f"{seg_starts.dtype} {tuple(seg_starts.shape)}")
    torch._check(seg_idx.dtype == torch.int64 and tuple(seg_idx.shape) == (seg_starts.shape[0] - 1,),
                 lambda: f"{name}: seg_idx must be int64 of shape (S,) = ({seg_starts.shape[0] - 1},), "
                         f"got {seg_idx.dtype} {tuple(seg_idx.shape)}")


def _check_shrink(name, x, A, ranks, scales):
    torch._check(x.dim() == 2, lambda: f"{name}: x must be (tokens, in), got {tuple(x.shape)}")
    _check_slots(name, A, ranks, scales)
    torch._check(x.dtype == A.dtype, lambda: f"{name}: x is {x.dtype} but A is {A.dtype}; they must match")
    torch._check(A.shape[2] == x.shape[1],
                 lambda: f"{name}: A is (slots, max_rank, in) = {tuple(A.shape)} but x has in = {x.shape[1]}")


def _check_expand(name, out, y, B, ranks):
    torch._check(out.dim() == 2 and y.dim() == 2,
                 lambda: f"{name}: out and y must be 2-D, got {tuple(out.shape)} and {tuple(y.shape)}")
    _check_slots(name, B, ranks)
    torch._check(out.dtype == B.dtype, lambda: f"{name}: out is {out.dtype} but B is {B.dtype}; they must match")
    torch._check(y.dtype == torch.float32, lambda: f"{name}: y must be float32 (shrink's output), got {y.dtype}")
    torch._check(tuple(B.shape[1:]) == (out.shape[1], y.shape[1]),
                 lambda: f"{name}: B must be (slots, out, max_rank) = (*, {out.shape[1]}, {y.shape[1]}), "
                         f"got {tuple(B.shape)}")
    torch._check(y.shape[0] == out.shape[0],
                 lambda: f"{name}: y has {y.shape[0]} tokens but out has {out.shape[0]}")


@torch.library.register_fake("lorabench::bgmv_shrink")
def _bgmv_shrink_fake(x, A, idx, ranks, scales):
    _check_shrink("bgmv_shrink", x, A, ranks, scales)
    _check_tokens("bgmv_shrink", x.shape[0], idx)
    return x.new_empty((x.shape[0], A.shape[1]), dtype=torch.float32)


@torch.library.register_fake("lorabench::bgmv_expand")
def _bgmv_expand_fake(out, y, B, idx, ranks):
    _check_expand("bgmv_expand", out, y, B, ranks)
    _check_tokens("bgmv_expand", out.shape[0], idx)


@torch.library.register_fake("lorabench::sgmv_shrink")
def _sgmv_shrink_fake(x, A, seg_starts, seg_idx, ranks, scales):
    _check_shrink("sgmv_shrink", x, A, ranks, scales)
    _check_segments("sgmv_shrink", seg_starts, seg_idx)
    return x.new_empty((x.shape[0], A.shape[1]), dtype=torch.float32)


@torch.library.register_fake("lorabench::sgmv_expand")
def _sgmv_expand_fake(out, y, B, seg_starts, seg_idx, ranks):
    _check_expand("sgmv_expand", out, y, B, ranks)
    _check_segments("sgmv_expand", seg_starts, seg_idx)


BACKENDS = ("reference", "cpu", "cuda")
_FAKES = {"bgmv_shrink": _bgmv_shrink_fake, "bgmv_expand": _bgmv_expand_fake,
          "sgmv_shrink": _sgmv_shrink_fake, "sgmv_expand": _sgmv_expand_fake}


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """`None`/"auto": the compiled kernel for the tensors' device when built, else the reference."""
    return _resolve_backend(backend, device.type)


@functools.lru_cache(maxsize=None)  # per call it would cost more than a decode-sized kernel
def _resolve_backend(backend: str | None, device_type: str) -> str:
    if backend in (None, "auto"):
        name = "cuda" if device_type == "cuda" else "cpu"
        return name if available_backends()[name][0] else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; valid: {', '.join(BACKENDS)} or 'auto'")
    if backend != "reference":
        ok, why = available_backends()[backend]
        if not ok:
            raise RuntimeError(f"backend {backend!r} is not available: {why}")
        if device_type != backend:
            raise ValueError(f"backend {backend!r} needs tensors on {backend}, got {device_type}")
    return backend


def _run(op: str, backend: str | None, device: torch.device, *args):
    be = resolve_backend(backend, device)
    if be == "reference":
        _FAKES[op](*args)  # the schema checks that the compiled kernels make at their binding
        return getattr(reference, op)(*args)
    return getattr(torch.ops.lorabench, op)(*args)


def bgmv_shrink(x, A, idx, ranks, scales, *, backend: str | None = None) -> torch.Tensor:
    """y[i, :r] = scales[l] * x[i] @ A[l, :r].T with l = idx[i], r = ranks[l]; y[i, r:] = 0; fp32."""
    return _run("bgmv_shrink", backend, x.device, x, A, idx, ranks, scales)


def bgmv_expand(out, y, B, idx, ranks, *, backend: str | None = None) -> torch.Tensor:
    """out[i] += y[i, :r] @ B[l, :, :r].T with l = idx[i] (in place; returns out)."""
    _run("bgmv_expand", backend, out.device, out, y, B, idx, ranks)
    return out


def sgmv_shrink(x, A, seg_starts, seg_idx, ranks, scales, *, backend: str | None = None) -> torch.Tensor:
    """bgmv_shrink with one slot per segment of tokens seg_starts[s]:seg_starts[s+1]."""
    return _run("sgmv_shrink", backend, x.device, x, A, seg_starts, seg_idx, ranks, scales)


def sgmv_expand(out, y, B, seg_starts, seg_idx, ranks, *, backend: str | None = None) -> torch.Tensor:
    """bgmv_expand with one slot per segment of tokens (in place; returns out)."""
    _run("sgmv_expand", backend, out.device, out, y, B, seg_starts, seg_idx, ranks)
    return out
