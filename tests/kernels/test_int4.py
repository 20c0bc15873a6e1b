"""Group-wise int4 ops and QA-LoRA's merge (lorabench/ops/int4.py): every backend against the reference,
the quantization bound, the merge (QA-LoRA sec. 3.3), gradients, opcheck, bad input.

Backends as in test_nf4.py; tolerance: conftest.assert_within_rule.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lorabench.ops import int4 as I
from tests.kernels.conftest import (DTYPES, assert_linear_grads_within_rule, assert_within_rule, backend_params,
                                    device_of)

BACKENDS = backend_params()
COMPILED = backend_params(("cpu", "cuda"))
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _on(s: I.Int4Weight, device) -> I.Int4Weight:
    return I.Int4Weight(s.packed.to(device), s.scales.to(device), s.zeros.to(device), s.group_size)


def _linear(backend, x, s, bias, A, B, scale):
    if backend == "reference":
        return I._int4_linear_ref(x, *s.tensors(), s.group_size, bias, A, B, scale)
    dev = device_of(backend)
    mv = lambda t: None if t is None else t.to(dev)  # noqa: E731
    return I.int4_linear(mv(x), _on(s, dev), mv(bias), mv(A), mv(B), scale).cpu()


@pytest.mark.parametrize("backend", backend_params(("cpu",)))
@SETTINGS
@given(rows=st.integers(1, 40), groups=st.integers(1, 6), group=st.sampled_from(I.GROUP_SIZES),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_quantize_and_dequantize_equal_reference(backend, rows, groups, group, dtype, seed):
    """The compiled quantizer produces the reference's bytes, scales and zeros; dequantization is exact."""
    w = torch.randn(rows, groups * group, generator=torch.Generator().manual_seed(seed)).to(dtype)
    w[0, :group] = 0.5  # a constant group: scale 1, q = 0, exact
    ref = I.Int4Weight(*I._int4_quantize_ref(w, group), group)
    got = I.int4_quantize(w, group)
    for a, b in zip(got.tensors(), ref.tensors()):
        assert torch.equal(a, b)
    assert torch.equal(I.int4_dequantize(got), I._int4_dequantize_ref(*ref.tensors(), group, torch.float32))
    deq = I.int4_dequantize(got)
    assert torch.equal(deq[0, :group], torch.full((group,), 0.5))
    # round to nearest: |w - w_hat| <= scale / 2 (plus rounding of the fp32 arithmetic)
    step = got.scales.repeat_interleave(group, dim=1)
    assert ((deq - w.float()).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("backend", COMPILED)
@SETTINGS
@given(tokens=st.sampled_from([0, 1, 2, 3, 7, 15, 16, 33, 64]), groups=st.integers(1, 6),
       group=st.sampled_from(I.GROUP_SIZES), n_out=st.integers(1, 70), rank=st.sampled_from([0, 1, 4, 16]),
       pooled=st.booleans(), dtype=st.sampled_from(DTYPES), bias=st.booleans(), seed=st.integers(0, 2**16))
@example(tokens=1, groups=9, group=64, n_out=1536, rank=8, pooled=True, dtype=torch.float32, bias=False, seed=0)
@example(tokens=64, groups=9, group=64, n_out=1536, rank=8, pooled=True, dtype=torch.bfloat16, bias=True, seed=0)
@example(tokens=3, groups=3, group=32, n_out=5, rank=2, pooled=False, dtype=torch.float16, bias=True, seed=0)
def test_linear_against_reference(backend, tokens, groups, group, n_out, rank, pooled, dtype, bias, seed):
    n_in = groups * group  # multiples of 32 that are not of 64 take the dequantize path
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g).to(dtype)
    s = I.int4_quantize(torch.randn(n_out, n_in, generator=g) / n_in ** 0.5, group)
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    a_in = groups if pooled else n_in
    A = (torch.randn(rank, a_in, generator=g) / a_in ** 0.5).to(dtype) if rank else None
    B = torch.randn(n_out, rank, generator=g).to(dtype) if rank else None
    truth = _linear("reference", x.double(), s, *(None if t is None else t.double() for t in (b, A, B)), 0.5)
    got = _linear(backend, x, s, b, A, B, 0.5)
    assert_within_rule("int4_linear", got, _linear("reference", x, s, b, A, B, 0.5), truth)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", I.GROUP_SIZES)
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_qalora_merge_into_zero_points(backend, group, tokens):
    """QA-LoRA sec. 3.3: with A on the group-averaged input, the merged int4 layer (same q and scales,
    zeros + s B A / group_size) computes the unmerged forward; a full-input A is refused."""
    g = torch.Generator().manual_seed(group)
    n_in, n_out, r = 4 * group, 48, 8
    s = I.int4_quantize(torch.randn(n_out, n_in, generator=g), group)
    A, B = torch.randn(r, n_in // group, generator=g), torch.randn(n_out, r, generator=g) * 0.1
    x = torch.randn(tokens, n_in, generator=g)
    unmerged = _linear(backend, x, s, None, A, B, 2.0)
    merged_state = I.Int4Weight(s.packed, s.scales, I.int4_merge_lora(s, A, B, 2.0), group)
    merged = _linear(backend, x, merged_state, None, None, None, 1.0)
    truth = _linear("reference", x.double(), s, None, A.double(), B.double(), 2.0)
    assert (merged.double() - truth).abs().max() <= 1e-4 * (1 + truth.abs().max())
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="zero points"):
        I.int4_merge_lora(s, torch.randn(r, n_in), B, 1.0)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("pooled", [False, True])
def test_gradcheck(backend, pooled):
    dev = device_of(backend)
    g = torch.Generator().manual_seed(0)
    s = _on(I.int4_quantize(torch.randn(6, 64, generator=g), 32), dev)
    mk = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64).to(dev).requires_grad_()  # noqa: E731
    x, b, A, B = mk(2, 64), mk(6), mk(3, 2 if pooled else 64), mk(6, 3)
    assert torch.autograd.gradcheck(lambda x, b, A, B: I.int4_linear(x, s, b, A, B, 0.7), (x, b, A, B))



@pytest.mark.parametrize("backend", backend_params(("cpu",)))
@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("tokens,rank", [(15, 8), (16, 8), (127, 8), (128, 8), (255, 16), (256, 16), (300, 4)])
def test_backward_both_orientations(backend, pooled, tokens, rank):
    """The CPU op takes x A^T, dy B and dB = s dy^T xa directly or transposed by tokens and rank (BLAS speed,
    csrc/narrow_products.h): the forward and every gradient on both sides of each switch point, against the
    reference's autograd in fp32 and fp64 (QA-LoRA's pooled A too)."""
    g = torch.Generator().manual_seed(tokens)
    n_in, n_out, group = 192, 130, 32
    s = I.int4_quantize(torch.randn(n_out, n_in, generator=g) / n_in ** 0.5, group)
    x, b = torch.randn(tokens, n_in, generator=g), torch.randn(n_out, generator=g)
    A = torch.randn(rank, n_in // group if pooled else n_in, generator=g) / 8
    B = torch.randn(n_out, rank, generator=g) / rank ** 0.5
    ref = lambda x, b, A, B: I._int4_linear_ref(x, *s.tensors(), group, b, A, B, 0.5)  # noqa: E731
    assert_linear_grads_within_rule(lambda x, b, A, B: I.int4_linear(x, s, b, A, B, 0.5), ref, x, b, A, B)


def test_opcheck():
    w = torch.randn(16, 128)
    torch.library.opcheck(torch.ops.lorabench.int4_quantize.default, (w, 64))
    s = I.int4_quantize(w, 64)
    torch.library.opcheck(torch.ops.lorabench.int4_dequantize.default, (*s.tensors(), 64, torch.float32))
    x, A, B = torch.randn(3, 128), torch.randn(2, 2), torch.randn(16, 2)
    torch.library.opcheck(torch.ops.lorabench.int4_linear.default, (x, *s.tensors(), 64, None, A, B, 0.5))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="group_size"):
        I.int4_quantize(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="group_size"):
        I.int4_quantize(torch.randn(4, 96), 16)
    s = I.int4_quantize(torch.randn(4, 64), 32)
    with pytest.raises(ValueError, match="in=64"):
        I.int4_linear(torch.randn(2, 32), s)
    with pytest.raises(RuntimeError, match="lora_A"):
        I.int4_linear(torch.randn(2, 64), s, None, torch.randn(2, 3), torch.randn(4, 2))


def test_int4_linear_module_roundtrip_and_merge():
    """Int4Linear: from_linear, forward, forward_lora (QA-LoRA pooled A), merge_lora, state_dict."""
    from lorabench.ops.modules import Int4Linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 24)
    mod = Int4Linear.from_linear(lin, group_size=32)
    W = mod.dequantize()
    assert W.shape == (24, 128)
    x = torch.randn(5, 128)
    torch.testing.assert_close(mod(x), x @ W.T + lin.bias, rtol=1e-5, atol=1e-5)
    A, B = torch.randn(4, 128 // 32), torch.randn(24, 4) * 0.1
    unmerged = mod.forward_lora(x, A, B, 2.0)
    fresh = Int4Linear(128, 24, bias=True, group_size=32)
    fresh.load_state_dict(mod.state_dict())
    assert torch.equal(fresh(x), mod(x))
    mod.merge_lora(A, B, 2.0)
    torch.testing.assert_close(mod(x), unmerged, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear.from_linear(torch.nn.Linear(100, 4), group_size=64)
