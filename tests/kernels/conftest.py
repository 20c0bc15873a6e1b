"""Shared helpers of the kernel tests (any kernel test file may import them).

Tolerance rule (docs/architecture.md, "Where things live", a kernel; after flash-attention's
tests): a backend's error against an fp64 (or fp32) truth is at most twice the error of the
PyTorch reference computed in the same low precision, plus a small epsilon that covers
summation-order noise when the reference is exact.
"""
from __future__ import annotations

import pytest
import torch

from lorabench.ops import available_backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Real hidden sizes and MLP widths: SmolLM2-135M (576, 1536), BERT-large-ish (1024), Llama-7B (4096, 11008).
REAL_SIZES = [(576, 576), (576, 1536), (1536, 576), (1024, 1024), (4096, 4096), (4096, 11008), (11008, 4096)]


def backend_params(names=("reference", "cpu", "cuda")):
    """pytest params for kernel backends, skipped (never failed) where a backend is unavailable."""
    avail = available_backends()
    return [pytest.param(b, marks=pytest.mark.skipif(not avail[b][0], reason=avail[b][1])) for b in names]


def device_of(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_rule(name: str, got: torch.Tensor, ref_lowp: torch.Tensor, truth: torch.Tensor,
                       eps_rel: float = 1e-5) -> None:
    """|got - truth| <= 2 |ref_lowp - truth| + eps, with eps = eps_rel * (1 + max |truth|); got must be finite."""
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert got.dtype == ref_lowp.dtype, f"{name}: dtype {got.dtype} != {ref_lowp.dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = truth.abs().max().item() if truth.numel() else 0.0
    finite = torch.isfinite(ref_lowp)  # the reference itself may overflow or divide by a rounded-off 0:
    ref_err = max_err(ref_lowp[finite], truth[finite])  # bound by its error where it has one
    err = max_err(got, truth)
    bound = 2 * ref_err + eps_rel * (1 + scale)
    assert err <= bound, f"{name}: error {err:.3g} > 2 x reference error {ref_err:.3g} + eps (bound {bound:.3g})"


def _outputs_and_grads(fn, x, b, A, B):
    x, b, A, B = (t.detach().clone().requires_grad_() for t in (x, b, A, B))
    y = fn(x, b, A, B)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).reshape(y.shape))  # a fixed, non-constant dy
    return [y.detach()] + [t.grad for t in (x, b, A, B)]


def assert_linear_grads_within_rule(got_fn, ref_fn, x, b, A, B) -> None:
    """y = fn(x, bias, lora_A, lora_B) and the gradients of x, bias, A, B under one fixed dy: got_fn against
    ref_fn's autograd in the inputs' dtype and in fp64, by assert_within_rule."""
    truth = _outputs_and_grads(ref_fn, *(t.double() for t in (x, b, A, B)))
    ref_lowp = _outputs_and_grads(ref_fn, x, b, A, B)
    got = _outputs_and_grads(got_fn, x, b, A, B)
    for name, g_, r_, t_ in zip(("y", "dx", "dbias", "dA", "dB"), got, ref_lowp, truth):
        assert_within_rule(name, g_, r_, t_)
