"""Every CUDA kernel of csrc/cuda, executed on the CPU through HIP-CPU (tests/kernels/hipcpu.py), against
the pure-PyTorch reference and an fp64 truth by conftest.assert_within_rule; bit for bit where the
kernel promises it (NF4 / int4 dequantization).

Kernels and what runs them here:
- nf4_int4.cu: dequantize_kernel (fp32, bf16, fp16 out; NF4 with fp32 or double-quantized absmax; int4),
  gemv_kernel<T, 1..8> (batches 1-8 in one launch, 9 and 16 in two; K up to 2080 = 65 chunks of 32, each
  lane looping three times; K % 32 != 0 and fp64 take the dequantize path, as in the binding).
- bgmv.cu: shrink_kernel and expand_kernel, BGMV (per-token slot) and SGMV (segments, empty ones
  included), fp32/bf16/fp16, non-contiguous rows, ranks 1..40 under a max_rank, slots padded with NaN
  past each rank (a read past the rank fails), bad slot indices and ranks (read nothing, as bgmv.h says).
- lora.cu: dora_norm_kernel (with its cancellation path), dora_epilogue_kernel, dora_grad_kernel, in
  fp32, bf16, fp16 and fp64.

Skipped, with the reason, where HIP-CPU or libtbb-dev is missing. test_mutations_are_caught (slow) plants
bugs in copies of the sources and checks that these checks fail on each.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lorabench.ops import int4 as I
from lorabench.ops import lora as L
from lorabench.ops import nf4 as N
from lorabench.ops import reference
from tests.kernels import hipcpu as H
from tests.kernels.conftest import DTYPES, assert_within_rule
from tests.kernels.test_dora_linear import make_dora_inputs
from tests.kernels.test_dora_linear import reference_with_grads as dora_reference_with_grads
from tests.kernels.test_lora_linear import LAYOUTS, RANKS, eps_for
from tests.kernels.test_multi_lora import draw_indices, make_slots, truth_expand, truth_shrink

REASON = H.why_unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALL_DTYPES = DTYPES + [torch.float64]


@pytest.fixture(scope="module")
def K() -> H.Kernels:
    lib, _ = H.build()
    return H.Kernels(lib)


# --- NF4 / int4 ------------------------------------------------------------------------------------

def _q4_inputs(tokens, n_in, n_out, rank, dtype, seed, bias, pooled_in=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g)
    x = torch.randn(tokens, n_in, generator=g).to(dtype)
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    a_in = pooled_in or n_in
    A = (torch.randn(rank, a_in, generator=g) / a_in ** 0.5).to(dtype) if rank else None
    B = (torch.randn(n_out, rank, generator=g) / max(rank, 1) ** 0.5).to(dtype) if rank else None
    return x, w, b, A, B


def check_nf4_dequantize(K, rows, cols, blocksize, double_quant, dtype, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    state = N.nf4_quantize(w, blocksize, double_quant)  # the project's own quantizer: no bitsandbytes needed
    args = (*state.tensors(), list(state.shape), blocksize, dtype)
    got, want = K.nf4_dequantize(*args), N._nf4_dequantize_ref(*args)
    assert got.dtype == want.dtype and torch.equal(got, want), \
        f"nf4 dequantize {dtype} {rows}x{cols} bs {blocksize}: max diff {(got.double() - want.double()).abs().max()}"


def check_nf4_linear(K, tokens, n_in, n_out, rank, dtype, blocksize, double_quant, bias, seed=0):
    x, w, b, A, B = _q4_inputs(tokens, n_in, n_out, rank, dtype, seed, bias)
    state = N.nf4_quantize(w, blocksize, double_quant)
    t = state.tensors()
    dbl = lambda v: None if v is None else v.double()  # noqa: E731
    truth = N._nf4_linear_ref(x.double(), *t, n_out, blocksize, dbl(b), dbl(A), dbl(B), 0.5)
    ref_lowp = N._nf4_linear_ref(x, *t, n_out, blocksize, b, A, B, 0.5)
    got = K.nf4_linear(x, *t, n_out, blocksize, b, A, B, 0.5)
    assert_within_rule(f"nf4_linear {dtype} tokens {tokens} in {n_in}", got, ref_lowp, truth)


def check_int4_linear(K, tokens, n_in, n_out, rank, dtype, group, bias, pooled, seed=0):
    x, w, b, A, B = _q4_inputs(tokens, n_in, n_out, rank, dtype, seed, bias, n_in // group if pooled else None)
    s = I.int4_quantize(w, group)
    t = s.tensors()
    dbl = lambda v: None if v is None else v.double()  # noqa: E731
    truth = I._int4_linear_ref(x.double(), *t, group, dbl(b), dbl(A), dbl(B), 0.5)
    ref_lowp = I._int4_linear_ref(x, *t, group, b, A, B, 0.5)
    got = K.int4_linear(x, *t, group, b, A, B, 0.5)
    assert_within_rule(f"int4_linear {dtype} tokens {tokens} in {n_in}", got, ref_lowp, truth)


@SETTINGS
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), blocksize=st.sampled_from([32, 64, 128, 256]),
       double_quant=st.booleans(), dtype=st.sampled_from(ALL_DTYPES), seed=st.integers(0, 2**16))
@example(rows=1, cols=1, blocksize=64, double_quant=False, dtype=torch.float32, seed=0)  # one weight, one byte
@example(rows=300, cols=300, blocksize=64, double_quant=True, dtype=torch.bfloat16, seed=0)  # > 256 blocks
def test_nf4_dequantize_is_the_reference_bit_for_bit(K, rows, cols, blocksize, double_quant, dtype, seed):
    check_nf4_dequantize(K, rows, cols, blocksize, double_quant, dtype, seed)


def test_nf4_dequantize_equals_bitsandbytes(K):
    """Where bitsandbytes is installed: its NF4 state (double quantization) dequantized by the kernel is
    bitsandbytes' own dequantization, bit for bit."""
    bnb_F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(70, 192, generator=torch.Generator().manual_seed(3))
    q, s = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    got = K.nf4_dequantize(q.reshape(-1), s.absmax, s.state2.absmax, s.state2.code, s.offset, [70, 192], 64,
                           torch.float32)
    assert torch.equal(got, bnb_F.dequantize_4bit(q, s))


@SETTINGS
@given(tokens=st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16]),
       n_in=st.sampled_from([32, 64, 96, 100, 192, 1056, 2080]), n_out=st.integers(1, 24),
       rank=st.sampled_from([0, 1, 4]), dtype=st.sampled_from(ALL_DTYPES), blocksize=st.sampled_from([32, 64, 128]),
       double_quant=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
# K = 2080: 65 chunks of 32 weights, so lane 0 of the GEMV's warp loops three times; batch 7 in one launch.
@example(tokens=7, n_in=2080, n_out=5, rank=4, dtype=torch.bfloat16, blocksize=64, double_quant=True, bias=True,
         seed=0)
@example(tokens=1, n_in=1056, n_out=9, rank=0, dtype=torch.float16, blocksize=32, double_quant=False, bias=False,
         seed=0)
def test_nf4_linear_against_reference(K, tokens, n_in, n_out, rank, dtype, blocksize, double_quant, bias, seed):
    check_nf4_linear(K, tokens, n_in, n_out, rank, dtype, blocksize, double_quant, bias, seed)


@SETTINGS
@given(rows=st.integers(1, 30), groups=st.integers(1, 5), group=st.sampled_from(I.GROUP_SIZES),
       dtype=st.sampled_from(ALL_DTYPES), seed=st.integers(0, 2**16))
def test_int4_dequantize_is_the_reference_bit_for_bit(K, rows, groups, group, dtype, seed):
    s = I.int4_quantize(torch.randn(rows, groups * group, generator=torch.Generator().manual_seed(seed)), group)
    got, want = K.int4_dequantize(*s.tensors(), group, dtype), I._int4_dequantize_ref(*s.tensors(), group, dtype)
    assert torch.equal(got, want)


@SETTINGS
@given(tokens=st.sampled_from([0, 1, 2, 3, 5, 6, 8, 9, 16]), groups=st.sampled_from([1, 2, 3, 17]),
       group=st.sampled_from(I.GROUP_SIZES), n_out=st.integers(1, 24), rank=st.sampled_from([0, 1, 4]),
       dtype=st.sampled_from(ALL_DTYPES), bias=st.booleans(), pooled=st.booleans(), seed=st.integers(0, 2**16))
@example(tokens=8, groups=17, group=128, n_out=3, rank=4, dtype=torch.float32, bias=True, pooled=True, seed=0)
def test_int4_linear_against_reference(K, tokens, groups, group, n_out, rank, dtype, bias, pooled, seed):
    check_int4_linear(K, tokens, groups * group, n_out, rank, dtype, group, bias, pooled, seed)


# --- BGMV / SGMV -----------------------------------------------------------------------------------

def check_multi_lora(K, x, A, B, idx, ranks, scales, out0, seg=None):
    """Shrink and expand (BGMV, or SGMV with seg = (starts, seg_idx) whose per-token slots are idx)
    against the fp64 truth; tokens without an adapter keep their output."""
    kw = dict(idx=idx) if seg is None else dict(seg_starts=seg[0], seg_idx=seg[1])
    y = K.shrink(x, A, ranks, scales, **kw)
    lowp = x.dtype
    assert_within_rule(f"shrink {x.dtype}", y, truth_shrink(x, A, idx, ranks, scales, lowp).float(),
                       truth_shrink(x, A, idx, ranks, scales))
    out = K.expand(out0.clone(), y, B, ranks, **kw)
    assert_within_rule(f"expand {x.dtype}", out, truth_expand(out0, y, B, idx, ranks, lowp).to(out0.dtype),
                       truth_expand(out0, y, B, idx, ranks))
    assert torch.equal(out[idx < 0], out0[idx < 0]), "a token without adapter was changed"
    return y, out


def _multi_inputs(n_tokens, n_slots, max_rank, n_in, n_out, dtype, mix, noncontig, seed):
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, max_rank + 1, (n_slots,), generator=g).tolist()
    A, B, ranks_t, scales = make_slots(n_slots, max_rank, n_in, n_out, ranks, dtype, g)
    wide = 2 if noncontig else 1  # every other column of a wider tensor: row stride != in
    x = torch.randn(n_tokens, wide * n_in, generator=g).to(dtype)[:, ::wide]
    out0 = torch.randn(n_tokens, wide * n_out, generator=g).to(dtype)[:, ::wide]
    return x, A, B, draw_indices(mix, n_tokens, n_slots, g), ranks_t, scales, out0


MIXES = ["distinct", "uniform", "zipf1.5", "identical", "skewed", "with_none"]


@SETTINGS
@given(n_tokens=st.integers(0, 12), n_slots=st.integers(1, 5), max_rank=st.integers(1, 40),
       n_in=st.integers(1, 97), n_out=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
       mix=st.sampled_from(MIXES), noncontig=st.booleans(), seed=st.integers(0, 2**16))
@example(n_tokens=3, n_slots=2, max_rank=16, n_in=576, n_out=576, dtype=torch.bfloat16, mix="with_none",
         noncontig=False, seed=0)  # SmolLM2's hidden size
def test_bgmv_against_truth(K, n_tokens, n_slots, max_rank, n_in, n_out, dtype, mix, noncontig, seed):
    check_multi_lora(K, *_multi_inputs(n_tokens, n_slots, max_rank, n_in, n_out, dtype, mix, noncontig, seed))


@SETTINGS
@given(n_tokens=st.integers(0, 12), n_slots=st.integers(1, 5), max_rank=st.integers(1, 24),
       dtype=st.sampled_from(DTYPES), cuts=st.lists(st.integers(0, 12), max_size=5), empty=st.booleans(),
       seed=st.integers(0, 2**16))
def test_sgmv_against_truth(K, n_tokens, n_slots, max_rank, dtype, cuts, empty, seed):
    x, A, B, _, ranks, scales, out0 = _multi_inputs(n_tokens, n_slots, max_rank, 40, 33, dtype, "uniform", False,
                                                    seed)
    bounds = sorted({0, n_tokens, *[min(c, n_tokens) for c in cuts]})
    if empty:  # empty segments at the front and in the middle
        bounds = [0] + bounds[: len(bounds) // 2 + 1] + bounds[len(bounds) // 2:]
    starts = torch.tensor(bounds, dtype=torch.int64)
    seg_idx = torch.randint(-1, n_slots, (starts.numel() - 1,), generator=torch.Generator().manual_seed(seed))
    idx = seg_idx.repeat_interleave(starts.diff())
    check_multi_lora(K, x, A, B, idx, ranks, scales, out0, seg=(starts, seg_idx))


def test_bad_indices_and_ranks_read_nothing(K):
    """The CUDA binding does not read indices on the host (that would synchronise): the kernels treat a
    slot outside [0, n_slots) as no adapter and clamp ranks to [0, max_rank] (bgmv.h). Slots past the
    tensor's end hold NaN here, so a read of them would show."""
    g = torch.Generator().manual_seed(0)
    n_slots, R, n_in, n_out = 3, 8, 40, 24
    A_all = torch.full((n_slots + 2, R, n_in), float("nan"))
    B_all = torch.full((n_slots + 2, n_out, R), float("nan"))
    A_all[:n_slots] = torch.randn(n_slots, R, n_in, generator=g)
    B_all[:n_slots] = torch.randn(n_slots, n_out, R, generator=g)
    A, B = A_all[:n_slots], B_all[:n_slots]  # contiguous views whose memory runs on into NaN slots
    x, out0 = torch.randn(6, n_in, generator=g), torch.randn(6, n_out, generator=g)
    scales = torch.ones(n_slots)
    ranks = torch.tensor([R + 5, -2, 4])  # too large (read as R), negative (read as 0), in range
    idx = torch.tensor([3, 4, -7, 0, 1, 2])  # past the slots, far negative, then one token per slot
    y = K.shrink(x, A, ranks, scales, idx=idx)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:3], torch.zeros(3, R)), "a bad index must mean no adapter"
    torch.testing.assert_close(y[3], x[3] @ A[0].T)  # rank clamped to max_rank
    assert torch.equal(y[4], torch.zeros(R)), "a negative rank must mean rank 0"
    torch.testing.assert_close(y[5, :4], x[5] @ A[2, :4].T)
    assert torch.equal(y[5, 4:], torch.zeros(R - 4))
    out = K.expand(out0.clone(), y, B, ranks, idx=idx)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:3], out0[:3]) and torch.equal(out[4], out0[4])
    torch.testing.assert_close(out[3], out0[3] + B[0] @ y[3])
    # SGMV: a segment's bad slot means no adapter for its tokens
    starts, seg_idx = torch.tensor([0, 2, 2, 6]), torch.tensor([7, 0, -3])
    y_s = K.shrink(x, A, ranks, scales, seg_starts=starts, seg_idx=seg_idx)
    assert torch.equal(y_s[:2], torch.zeros(2, R)) and torch.equal(y_s[2:], torch.zeros(4, R))
    out_s = K.expand(out0.clone(), torch.ones(6, R), B, ranks, seg_starts=starts, seg_idx=seg_idx)
    assert torch.equal(out_s, out0)


# --- DoRA ------------------------------------------------------------------------------------------

def check_dora(K, tokens, n_in, n_out, rank, dtype, scale, **kw):
    x, W, b, A, B, m, mask, dy = make_dora_inputs(tokens, n_in, n_out, rank, dtype, "cpu", **kw)
    y, xa, u, norm = K.dora_linear(x, W, b, A, B, m, scale, mask)
    got = (y, *K.dora_linear_backward(dy, x, W, A, B, m, xa, u, norm, scale, mask, True))
    truth = dora_reference_with_grads(x, W, b, A, B, m, scale, mask, dy, torch.float64)
    lowp = dora_reference_with_grads(x, W, b, A, B, m, scale, mask, dy, dtype)
    for name, g_, l_, t_ in zip(("y", "dx", "dA", "dB", "dm"), got, lowp, truth):
        assert_within_rule(f"dora {dtype} {name}", g_, l_, t_, eps_for(dtype) if dtype != torch.float64 else 1e-12)


@SETTINGS
@given(tokens=st.sampled_from([0, 1, 2, 3, 7, 16, 33]), n_in=st.integers(1, 160), n_out=st.integers(1, 160),
       rank=st.sampled_from(RANKS), dtype=st.sampled_from(ALL_DTYPES), scale=st.sampled_from([0.0, 0.5, 2.0]),
       bias=st.booleans(), dropout=st.booleans(), layout=st.sampled_from(LAYOUTS))
# 33 tokens over the grad kernel's 8 rows of threads; 70 outputs: a partial block of 32 columns
@example(tokens=33, n_in=300, n_out=70, rank=16, dtype=torch.float64, scale=2.0, bias=True, dropout=True,
         layout="contiguous")
@example(tokens=33, n_in=600, n_out=70, rank=8, dtype=torch.bfloat16, scale=0.5, bias=True, dropout=False,
         layout="strided")
def test_dora_against_reference(K, tokens, n_in, n_out, rank, dtype, scale, bias, dropout, layout):
    check_dora(K, tokens, n_in, n_out, rank, dtype, scale, bias=bias, dropout=dropout, layout=layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dora_norm_cancellation_path(K, dtype):
    """W_j = -s B_j A + a small remainder: the expanded norm cancels, and the kernel recomputes those rows
    from the formed row. Without the recomputation (cancellation threshold 0) fp32 is far off: the path is
    what makes it right."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(8, 300, generator=g, dtype=dtype), torch.randn(40, 8, generator=g, dtype=dtype)
    W = -1.5 * B @ A
    W[::2] += 1e-3 * torch.randn(20, 300, generator=g, dtype=dtype)  # even rows nearly cancel, odd rows exactly
    truth = torch.linalg.norm(W.double() + 1.5 * (B.double() @ A.double()), dim=1)
    got = K.dora_norm(W, A, B, 1.5)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), truth, rtol=1e-2 if dtype == torch.float32 else 1e-9, atol=1e-4)
    torch.testing.assert_close(got.double(), L._dora_norm(W, A, B, 1.5).double(), rtol=1e-2, atol=1e-4)
    if dtype == torch.float32:
        expanded = K.dora_norm(W, A, B, 1.5, cancellation=0.0)
        assert (expanded.double() - truth).abs().max() > 1e-2, "the expansion alone did not cancel: a weak case"


# --- planted bugs ------------------------------------------------------------------------------------

# (file, original text, mutated text): each must make one of the checks below fail.
MUTATIONS = {
    "nf4 dequantize: nibbles swapped": (
        "nf4_int4.cu", "float w0 = __fmul_rn(lut[b >> 4], s), w1 = __fmul_rn(lut[b & 15], s);",
        "float w0 = __fmul_rn(lut[b & 15], s), w1 = __fmul_rn(lut[b >> 4], s);"),
    "nf4 gemv: nibbles swapped": (
        "nf4_int4.cu", "const float w0 = lut[b8 >> 4], w1 = lut[b8 & 15u];",
        "const float w0 = lut[b8 & 15u], w1 = lut[b8 >> 4];"),
    "gemv: lanes stride 64 chunks (each lane loops once too few at large K)": (
        "nf4_int4.cu", "for (int64_t c = lane; c < K / 32; c += 32) {", "for (int64_t c = lane; c < K / 32; c += 64) {"),
    "gemv: warp reduction starts at offset 8": (
        "nf4_int4.cu", "for (int off = 16; off > 0; off >>= 1) v +=", "for (int off = 8; off > 0; off >>= 1) v +="),
    "sgmv: segment bound off by one": (
        "bgmv.cu", "if (p.seg_starts[mid] <= t) lo = mid; else hi = mid;",
        "if (p.seg_starts[mid] < t) lo = mid; else hi = mid;"),
    "shrink: one row past the rank": (
        "bgmv.cu", "if (l < 0 || j >= rank_of(p, l)) {", "if (l < 0 || j > rank_of(p, l)) {"),
    "expand: accumulates without the rank's last column": (
        "bgmv.cu", "for (int64_t j = 0; j < r; ++j) acc += ys[j]", "for (int64_t j = 1; j < r; ++j) acc += ys[j]"),
    "dora norm: cancellation rows not recomputed": (
        "lora.cu", "if (sq < static_cast<A>(p.cancellation) * (w_sq + s * s * ba_sq)) {", "if (false) {"),
    "dora grad: one row of threads left out of the reduction": (
        "lora.cu", "for (int r = 1; r < blockDim.y; ++r) acc += part[r][threadIdx.x];",
        "for (int r = 2; r < blockDim.y; ++r) acc += part[r][threadIdx.x];"),
    "dora epilogue: bias of column 0 for all": (
        "lora.cu", "if (bias) v += to_acc(bias[j]);", "if (bias) v += to_acc(bias[0]);"),
}


def run_checks(K) -> None:
    """A compact pass over every kernel: what each mutation must break."""
    for dtype in (torch.float32, torch.bfloat16):
        check_nf4_dequantize(K, 9, 130, 64, True, dtype)
        check_nf4_linear(K, 7, 2080, 6, 4, dtype, 64, True, True)
        check_int4_linear(K, 5, 1088, 6, 4, dtype, 64, True, False)
    check_multi_lora(K, *_multi_inputs(9, 3, 12, 70, 50, torch.float32, "with_none", False, 0))
    x, A, B, _, ranks, scales, out0 = _multi_inputs(9, 3, 12, 40, 33, torch.float32, "uniform", False, 1)
    starts, seg_idx = torch.tensor([0, 3, 3, 5, 9]), torch.tensor([0, 2, 1, 2])
    check_multi_lora(K, x, A, B, seg_idx.repeat_interleave(starts.diff()), ranks, scales, out0, seg=(starts, seg_idx))
    check_dora(K, 33, 300, 70, 16, torch.float32, 2.0, bias=True)
    test_dora_norm_cancellation_path(K, torch.float32)


def test_unmutated_kernels_pass_the_mutation_checks(K):
    run_checks(K)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutations_are_caught(name, tmp_path):
    """A planted bug in a copy of csrc (one .cu rebuilt, about 15-35 s) must fail run_checks."""
    file, old, new = MUTATIONS[name]
    csrc = tmp_path / "csrc"
    shutil.copytree(H.CSRC, csrc)
    path = csrc / "cuda" / file
    text = path.read_text()
    assert text.count(old) == 1, f"the mutation's target text is not (once) in {file}: {old!r}"
    path.write_text(text.replace(old, new))
    lib, _ = H.build(csrc)
    with pytest.raises(AssertionError):
        run_checks(H.Kernels(lib))
