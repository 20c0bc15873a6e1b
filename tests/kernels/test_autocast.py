"""The fused ops under torch.autocast follow its policy for a linear layer (lorabench/ops/_backend.py, autocast_dtype):
fp32 x, bias and master factors in, the op computed in bf16 (the same numbers as calling it on bf16 copies), a bf16
output as F.linear's, and fp32 gradients for the fp32 factors, close to the fp32 op's. Before, the fused DoRA, NF4 and
int4 kernels refused a bf16 activation beside fp32 factors, which kept the full board out of bf16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorabench import ops
from lorabench.ops import int4 as I4
from lorabench.ops import nf4 as N


def _inputs(seed=0, tokens=24, d_in=128, d_out=64, r=4, a_in=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens // 2, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(d_out, generator=g) * 0.1
    a = (torch.randn(r, a_in or d_in, generator=g) / d_in ** 0.5).requires_grad_()
    bb = (torch.randn(d_out, r, generator=g) * 0.1).requires_grad_()
    return x, w, b, a, bb


def _lora(x, w, b, a, bb, extra):
    return ops.lora_linear(x, w, b, a, bb, 2.0, kernel="fused")


def _dora(x, w, b, a, bb, extra):
    return ops.dora_linear(x, w, b, a, bb, extra, 2.0, kernel="fused")


def _nf4(x, w, b, a, bb, extra):
    return N.nf4_linear(x, extra, b, a, bb, 2.0)


def _int4(x, w, b, a, bb, extra):
    return I4.int4_linear(x, extra, b, a, bb, 2.0)


def _case(name):
    x, w, b, a, bb = _inputs(a_in=128 // 32 if name == "qa-lora" else None)
    extra = {"lora": None, "dora": torch.linalg.norm(w, dim=1).requires_grad_(), "qlora": N.nf4_quantize(w, 64),
             "qa-lora": I4.int4_quantize(w, 32)}[name]
    fn = {"lora": _lora, "dora": _dora, "qlora": _nf4, "qa-lora": _int4}[name]
    return fn, x, w, b, a, bb, extra


CASES = ["lora", "dora", "qlora", "qa-lora"]


@pytest.mark.parametrize("name", CASES)
def test_fused_op_under_autocast_computes_in_bf16_as_f_linear(name):
    fn, x, w, b, a, bb, extra = _case(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x, w, b, a, bb, extra)
        ref_dtype = F.linear(x, w, b).dtype
    assert y.dtype == ref_dtype == torch.bfloat16
    # the same numbers as the op on bf16 copies outside autocast: the op ran in bf16, nothing else changed
    cast = lambda t: t.detach().to(torch.bfloat16) if isinstance(t, torch.Tensor) else t  # noqa: E731
    y16 = fn(cast(x), cast(w), cast(b), cast(a), cast(bb), cast(extra))
    assert torch.equal(y.detach(), y16)
    # and close to the fp32 op (bf16 keeps 8 bits of mantissa; the products accumulate in fp32)
    y32 = fn(x, w, b, a, bb, extra).detach()
    err = float((y.detach().float() - y32).abs().max() / y32.abs().max())
    assert err < 2e-2, err


@pytest.mark.parametrize("autograd", ["compiled", "python"])
@pytest.mark.parametrize("name", CASES)
def test_fused_op_under_autocast_gives_fp32_factors_fp32_gradients(name, autograd, monkeypatch):
    """Both autograds: the compiled ops' C++ kernels, and the Python autograd.Functions used without the extension."""
    if autograd == "python":
        from lorabench.ops import lora as L
        monkeypatch.setattr(L, "_python_autograd", lambda: True)
        monkeypatch.setattr(N, "extension", lambda: None)
        calls = []
        for cls in (L.LoraLinearFunction, L.DoraLinearFunction, N.QuantLinearFunction):
            monkeypatch.setattr(cls, "apply", (lambda f: lambda *a: calls.append(1) or f(*a))(cls.apply))
    fn, x, w, b, a, bb, extra = _case(name)
    leaves = [t for t in (a, bb, extra) if isinstance(t, torch.Tensor) and t.requires_grad]
    grads32 = torch.autograd.grad(fn(x, w, b, a, bb, extra).square().sum(), leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fn(x, w, b, a, bb, extra).float().square().sum()
    grads16 = torch.autograd.grad(loss, leaves)
    if autograd == "python":
        assert len(calls) == 2, calls   # the Function ran, in fp32 and under autocast
    for g16, g32, leaf in zip(grads16, grads32, leaves):
        assert g16.dtype == leaf.dtype == torch.float32
        rel = float((g16 - g32).norm() / g32.norm())
        assert rel < 5e-2, (name, rel)


def test_outside_autocast_the_ops_keep_their_dtype_rule():
    fn, x, w, b, a, bb, extra = _case("dora")
    assert fn(x, w, b, a, bb, extra).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):   # outside autocast mixed dtypes are still an error, named
        fn(x.to(torch.bfloat16), w, b, a, bb, extra)
