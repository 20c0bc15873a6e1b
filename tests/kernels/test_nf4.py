"""NF4 ops (lorabench/ops/nf4.py): bit-compatibility with bitsandbytes, every backend against the reference,
the quantization error, gradients, opcheck, bad input.

Backends: "reference" is the pure-PyTorch kernel registered as the fallback, "cpu" the compiled C++ kernel,
"cuda" the CUDA one (skipped without a GPU). Tolerance: conftest.assert_within_rule (twice the error of
the reference computed in the activation dtype, against the same reference in fp64, plus epsilon).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lorabench.ops import nf4 as N
from lorabench.ops import reference
from tests.kernels.conftest import (DTYPES, assert_linear_grads_within_rule, assert_within_rule, backend_params,
                                    device_of)

try:  # the bitsandbytes comparisons skip without it; everything else runs against the project's own reference
    import bitsandbytes.functional as bnb_F
except ImportError:
    bnb_F = None
needs_bnb = pytest.mark.skipif(bnb_F is None, reason="bitsandbytes is not installed")

BACKENDS = backend_params()
COMPILED = backend_params(("cpu", "cuda"))
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _on(state: N.NF4Weight, device) -> N.NF4Weight:
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return N.NF4Weight(move(state.packed), move(state.absmax), state.shape, state.blocksize, move(state.absmax2),
                       move(state.code2), move(state.offset))


def _quantize(backend, w, blocksize):
    if backend == "reference":
        return N._nf4_quantize_ref(w, blocksize)
    p, a = torch.ops.lorabench.nf4_quantize(w.to(device_of(backend)), blocksize)
    return p.cpu(), a.cpu()


def _dequantize(backend, state, dtype):
    if backend == "reference":
        return N._nf4_dequantize_ref(*state.tensors(), list(state.shape), state.blocksize, dtype)
    return N.nf4_dequantize(_on(state, device_of(backend)), dtype).cpu()


def _linear(backend, x, state, bias, A, B, scale):
    if backend == "reference":
        return N._nf4_linear_ref(x, *state.tensors(), state.shape[0], state.blocksize, bias, A, B, scale)
    dev = device_of(backend)
    mv = lambda t: None if t is None else t.to(dev)  # noqa: E731
    return N.nf4_linear(mv(x), _on(state, dev), mv(bias), mv(A), mv(B), scale).cpu()


def _bnb_state(w, blocksize, double_quant) -> tuple[N.NF4Weight, object, torch.Tensor]:
    q, st_ = bnb_F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    if double_quant:
        s = N.NF4Weight(q.reshape(-1), st_.absmax, tuple(w.shape), blocksize, st_.state2.absmax, st_.state2.code,
                        st_.offset)
    else:
        s = N.NF4Weight(q.reshape(-1), st_.absmax, tuple(w.shape), blocksize)
    return s, st_, q


@needs_bnb
def test_code_books_are_bitsandbytes():
    assert torch.equal(reference.NF4_CODE, bnb_F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(reference.dynamic_code(), bnb_F.create_dynamic_map(signed=True))


@needs_bnb
@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(rows=st.integers(1, 70), cols=st.integers(1, 300), blocksize=st.sampled_from([32, 64, 128, 256]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
@example(rows=7, cols=9, blocksize=64, dtype=torch.float32, seed=0)  # odd count, one partial block
@example(rows=576, cols=1536, blocksize=64, dtype=torch.float32, seed=1)  # SmolLM2 MLP
def test_quantize_bytes_and_absmax_equal_bitsandbytes(backend, rows, cols, blocksize, dtype, seed):
    """Same packed bytes (nibble order, odd-count padding) and the same fp32 absmax as quantize_4bit,
    for any shape: blocks run over the flattened weight, the last one may be partial."""
    w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    q, st_ = bnb_F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    packed, absmax = _quantize(backend, w, blocksize)
    assert packed.dtype == torch.uint8 and packed.shape == ((w.numel() + 1) // 2,)
    assert torch.equal(packed, q.reshape(-1)), "packed bytes differ from bitsandbytes"
    assert torch.equal(absmax, st_.absmax), "absmax differs from bitsandbytes"


@pytest.mark.parametrize("backend", COMPILED)
@SETTINGS
@given(rows=st.integers(1, 70), cols=st.integers(1, 300), blocksize=st.sampled_from([32, 64, 128, 256]),
       double_quant=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
@example(rows=7, cols=9, blocksize=64, double_quant=True, dtype=torch.float32, seed=0)  # odd count, partial block
def test_quantize_and_dequantize_equal_the_reference(backend, rows, cols, blocksize, double_quant, dtype, seed):
    """Without bitsandbytes too: the compiled quantizer gives the reference's bytes and absmax, and the
    compiled dequantization of the project's own state (double quantization included) is the reference's."""
    w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    packed, absmax = _quantize(backend, w, blocksize)
    ref_packed, ref_absmax = _quantize("reference", w, blocksize)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    state = N.nf4_quantize(w, blocksize, double_quant)
    assert torch.equal(_dequantize(backend, state, dtype), _dequantize("reference", state, dtype))


@needs_bnb
def test_quantize_zero_block_and_ties():
    """An all-zero block and values exactly on NF4 midpoints quantize as bitsandbytes does."""
    mid = ((reference.NF4_CODE[:-1] + reference.NF4_CODE[1:]) / 2)
    w = torch.cat([torch.zeros(64), torch.cat([mid, -mid, torch.tensor([1.0])]).repeat(3)[:64]]).reshape(2, 64)
    q, st_ = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    for backend in ("reference", "cpu"):
        if backend == "cpu" and not N.extension():
            continue
        packed, absmax = _quantize(backend, w, 64)
        assert torch.equal(packed, q.reshape(-1)) and torch.equal(absmax, st_.absmax), backend


@needs_bnb
def test_double_quant_layout_matches_bitsandbytes():
    """Double quantization: same offset (mean absmax), same fp32 second-level absmax per 256, same 8-bit
    codes except where bitsandbytes' CPU binary search (BinSearch Direct2) returns the farther of two
    neighbouring codes for a value within a hair of their midpoint: there ours is the nearer one."""
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(3))
    ours = N.nf4_quantize(w, 64, double_quant=True)
    _, st_ = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours.offset, st_.offset)
    assert torch.equal(ours.absmax2, st_.state2.absmax)
    assert torch.equal(ours.code2, st_.state2.code)
    agree = (ours.absmax == st_.absmax).float().mean().item()
    assert agree > 0.99, f"only {agree:.4f} of the 8-bit absmax codes agree with bitsandbytes"
    plain = N.nf4_quantize(w, 64, double_quant=False).absmax
    x = plain - ours.offset
    code = ours.code2
    scale2 = ours.absmax2.repeat_interleave(256)[: x.numel()]
    err_ours = (code[ours.absmax.long()] * scale2 - x).abs()
    err_bnb = (code[st_.absmax.long()] * scale2 - x).abs()
    assert (err_ours <= err_bnb + 1e-7).all(), "a differing code is farther than bitsandbytes' one"


@needs_bnb
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,blocksize", [((96, 128), 64), ((33, 65), 64), ((64, 256), 128), ((3, 7), 32)])
def test_dequantize_bitsandbytes_state_exactly(backend, double_quant, dtype, shape, blocksize):
    """bitsandbytes' quantized weights (its own nested codes included) dequantize identically here."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    state, st_, q = _bnb_state(w, blocksize, double_quant)
    st_.dtype = dtype
    expect = bnb_F.dequantize_4bit(q, st_)
    got = _dequantize(backend, state, dtype)
    assert got.dtype == dtype and torch.equal(got, expect)


def test_quantization_error_no_worse_than_bitsandbytes():
    """N(0,1) weights, blocksize 64: mean absolute error ~0.073 (QLoRA's NF4) and, where bitsandbytes is
    installed, not above bitsandbytes'."""
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    for dq in (False, True):
        ours = (N.nf4_dequantize(N.nf4_quantize(w, 64, double_quant=dq)) - w).abs().mean().item()
        assert 0.065 < ours < 0.080, f"mean abs error {ours:.4f} (double_quant={dq})"
        if bnb_F is None:
            continue
        q, st_ = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        theirs = (bnb_F.dequantize_4bit(q, st_) - w).abs().mean().item()
        assert ours <= theirs + 1e-6, f"ours {ours:.6f} > bitsandbytes {theirs:.6f} (double_quant={dq})"


def _inputs(tokens, n_in, n_out, rank, dtype, seed, bias):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g).to(dtype)
    w = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    A = (torch.randn(rank, n_in, generator=g) / n_in ** 0.5).to(dtype) if rank else None
    B = (torch.randn(n_out, rank, generator=g) / max(rank, 1) ** 0.5).to(dtype) if rank else None
    return x, w, b, A, B


@pytest.mark.parametrize("backend", COMPILED)
@SETTINGS
@given(tokens=st.sampled_from([0, 1, 2, 3, 5, 8, 15, 16, 17, 64, 70]), n_in=st.sampled_from([64, 96, 128, 192, 320, 100]),
       n_out=st.integers(1, 80), rank=st.sampled_from([0, 1, 4, 16]), dtype=st.sampled_from(DTYPES),
       blocksize=st.sampled_from([32, 64, 128]), double_quant=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 2**16))
@example(tokens=1, n_in=576, n_out=1536, rank=8, dtype=torch.float32, blocksize=64, double_quant=True, bias=False,
         seed=0)  # SmolLM2 MLP, batch 1
@example(tokens=64, n_in=576, n_out=1536, rank=8, dtype=torch.bfloat16, blocksize=64, double_quant=True, bias=True,
         seed=0)  # tiled GEMM path
def test_linear_against_reference(backend, tokens, n_in, n_out, rank, dtype, blocksize, double_quant, bias, seed):
    """nf4_linear (GEMV for < 16 tokens, tiled GEMM from 16 on; in % blocksize != 0 takes the dequantize
    path) against the reference in the same dtype and in fp64."""
    x, w, b, A, B = _inputs(tokens, n_in, n_out, rank, dtype, seed, bias)
    state = N.nf4_quantize(w, blocksize, double_quant)
    truth = _linear("reference", x.double(), state, *(None if t is None else t.double() for t in (b, A, B)), 0.5)
    ref_lowp = _linear("reference", x, state, b, A, B, 0.5)
    got = _linear(backend, x, state, b, A, B, 0.5)
    assert_within_rule("nf4_linear", got, ref_lowp, truth)


@pytest.mark.parametrize("backend", COMPILED)
def test_linear_non_contiguous_and_batched_shapes(backend):
    x, w, _, _, _ = _inputs(6, 256, 40, 0, torch.float32, 0, False)
    state = N.nf4_quantize(w, 64)
    x3 = torch.randn(2, 3, 512)[..., ::2]  # (2, 3, 256), non-contiguous
    got = _linear(backend, x3, state, None, None, None, 1.0)
    want = x3 @ N.nf4_dequantize(state).T
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", COMPILED)
def test_gradcheck_input_and_lora(backend):
    """dx = dy W_nf4 (+ LoRA), dA, dB, dbias by gradcheck in float64; the quantized base gets no gradient."""
    dev = device_of(backend)
    g = torch.Generator().manual_seed(0)
    state = _on(N.nf4_quantize(torch.randn(12, 64, generator=g), 64), dev)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dev).requires_grad_()  # noqa: E731
    x, b, A, B = mk(3, 64), mk(12), mk(4, 64), mk(12, 4)
    assert torch.autograd.gradcheck(lambda x, b, A, B: N.nf4_linear(x, state, b, A, B, 0.7), (x, b, A, B))



@pytest.mark.parametrize("backend", backend_params(("cpu",)))
@pytest.mark.parametrize("tokens,rank", [(15, 8), (16, 8), (127, 8), (128, 8), (255, 16), (256, 16), (300, 4)])
def test_backward_both_orientations(backend, tokens, rank):
    """The CPU op takes x A^T, dy B and dB = s dy^T xa directly or transposed by tokens and rank (BLAS speed,
    csrc/narrow_products.h): the forward and every gradient on both sides of each switch point, against the
    reference's autograd in fp32 and fp64."""
    x, w, b, A, B = _inputs(tokens, 192, 130, rank, torch.float32, tokens, True)
    state = N.nf4_quantize(w, 64, True)
    ref = lambda x, b, A, B: N._nf4_linear_ref(x, *state.tensors(), 130, 64, b, A, B, 0.5)  # noqa: E731
    assert_linear_grads_within_rule(lambda x, b, A, B: N.nf4_linear(x, state, b, A, B, 0.5), ref, x, b, A, B)


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    torch.library.opcheck(torch.ops.lorabench.nf4_quantize.default, (w, 64))
    s = N.nf4_quantize(w, 64, double_quant=True)
    torch.library.opcheck(torch.ops.lorabench.nf4_dequantize.default,
                          (*s.tensors(), [16, 64], 64, torch.float32))
    x, A, B = torch.randn(3, 64), torch.randn(2, 64), torch.randn(16, 2)
    torch.library.opcheck(torch.ops.lorabench.nf4_linear.default,
                          (x, *s.tensors(), 16, 64, None, A, B, 0.5))


def test_bad_input_is_named():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="blocksize 48"):
        N.nf4_quantize(w, 48)
    with pytest.raises(ValueError, match="int32"):
        N.nf4_quantize(w.int(), 64)
    s = N.nf4_quantize(w, 64)
    with pytest.raises(ValueError, match="in=64"):
        N.nf4_linear(torch.randn(2, 32), s)
    bad = N.NF4Weight(s.packed[:-1], s.absmax, s.shape, 64)
    with pytest.raises(RuntimeError, match="packed"):
        N.nf4_linear(torch.randn(2, 64), bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_gemv_matches_cpu_for_real_sizes():
    for n_out, n_in in [(4096, 4096), (11008, 4096), (1536, 576)]:
        w = torch.randn(n_out, n_in)
        state = N.nf4_quantize(w, 64)
        for tokens in (1, 8, 64):
            x = torch.randn(tokens, n_in, dtype=torch.bfloat16)
            got = N.nf4_linear(x.cuda(), _on(state, "cuda")).cpu()
            assert_within_rule("nf4 cuda", got, _linear("reference", x, state, None, None, None, 1.0),
                               _linear("reference", x.double(), state, None, None, None, 1.0))


def test_nf4_linear_module_roundtrip():
    """NF4Linear: from_linear, forward, forward_lora, dequantize, state_dict save/load of the packed weight."""
    from lorabench.ops.modules import NF4Linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 24)
    mod = NF4Linear.from_linear(lin, blocksize=64, double_quant=True)
    assert (mod.in_features, mod.out_features) == (128, 24)
    W = mod.dequantize()
    assert W.shape == (24, 128) and (W - lin.weight).abs().mean() < 0.1 * lin.weight.abs().mean()
    x = torch.randn(5, 128)
    torch.testing.assert_close(mod(x), x @ W.T + lin.bias, rtol=1e-5, atol=1e-5)
    A, B = torch.randn(4, 128) * 0.1, torch.randn(24, 4) * 0.1
    torch.testing.assert_close(mod.forward_lora(x, A, B, 2.0), x @ W.T + lin.bias + 2.0 * (x @ A.T) @ B.T,
                               rtol=1e-5, atol=1e-5)
    sd = mod.state_dict()
    assert sd["packed"].dtype == torch.uint8 and sd["absmax"].dtype == torch.uint8
    fresh = NF4Linear(128, 24, bias=True, blocksize=64, double_quant=True)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), mod(x))
    half = NF4Linear.from_linear(lin, double_quant=False, compute_dtype=torch.bfloat16)
    assert half(x).dtype == torch.bfloat16 and half.absmax.dtype == torch.float32


@pytest.mark.parametrize("op", ["nf4_linear", "int4_linear"])
def test_benchmark_is_registered_and_runs(op):
    """`python -m lorabench bench kernels --op nf4_linear|int4_linear` on a tiny grid: rows and targets."""
    from lorabench.bench import kernels as K
    cfg = K.Config(op=op, tokens=(1, 17), shapes=((128, 64),), rounds=1, sample_s=0.0005,
                   options=(("bw_gib", "0.01"),))
    rows = K.resolve(op)(cfg, log=lambda *_: None)
    assert [(r.tokens, r.n_in, r.n_out) for r in rows] == [(1, 128, 64), (17, 128, 64)]
    assert all(r.ours_us > 0 and r.gbps > 0 and r.read_bw_gbps > 0 for r in rows)
    summary = K.SUMMARIES[op](rows)
    assert summary["read_bw_gbps"] == rows[0].read_bw_gbps
