"""Every CUDA kernel of csrc/cuda, executed on the CPU through HIP-CPU (tests/kernels/hipcpu.py), against
the pure-PyTorch reference and an fp64 truth by conftest.assert_within_rule; bit for bit where the
kernel promises it (NF4 / int4 dequantization).

Kernels and what runs them here:
- nf4_int4.cu: dequantize_kernel (fp32, bf16, fp16 out; NF4 with fp32 or double-quantized absmax; int4),
  gemv_kernel<T, 1..8> (batches 1-8 in one launch, 9 and 16 in two; K up to 2080 = 65 chunks of 32, each
  lane looping three times; x by 16-byte vectors, and by scalars one element off alignment: the same
  bits; K % 32 != 0 and fp64 take the dequantize path, as in the binding).
- bgmv.cu: BGMV's bgmv_shrink_kernel<T, 1 or 4 rows> (`in` split across the block and, at few tokens,
  across blocks with shrink_reduce_kernel adding the splits), bgmv_expand_kernel (lane groups of 1..32
  per output); SGMV's grouped GEMM sgmv_shrink_kernel / sgmv_expand_kernel (tiles of 32 tokens per
  segment, empty segments included); fp32/bf16/fp16, 16-byte and scalar loads, non-contiguous rows,
  ranks 1..130 under a max_rank, slots padded with NaN past each rank (a read past the rank fails), bad
  slot indices and ranks (read nothing, as bgmv.h says).
- lora.cu: dora_norm_kernel (with its cancellation path), dora_epilogue_kernel, dora_grad_kernel over
  blocks of 64 tokens with dora_grad_reduce_kernel (deterministic), in fp32, bf16, fp16 and fp64.

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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_gemv_vector_and_scalar_x_loads_agree(K, dtype, tokens):
    """The GEMV loads x by 16-byte vectors where its rows are 16-byte aligned and by scalars otherwise (a
    view one element into its storage): the same sums in the same order, so the same bits, and both
    within the rule of the fp64 truth. K = 2080: 65 chunks, lanes loop three times."""
    n_in, n_out = 2080, 5
    x, w, _, _, _ = _q4_inputs(tokens, n_in, n_out, 0, dtype, 4, False)
    state = N.nf4_quantize(w, 64, True)
    p = K.nf4_params(*state.tensors(), n_out, n_in, 64)
    shifted = torch.empty(tokens * n_in + 1, dtype=dtype)[1:].view(tokens, n_in)  # rows at an odd offset
    shifted.copy_(x)
    assert x.data_ptr() % 16 == 0 and shifted.data_ptr() % 16 != 0 and shifted.is_contiguous()
    vec, scalar = K.q4_gemv(p, x), K.q4_gemv(p, shifted)
    assert torch.equal(vec, scalar), f"max diff {(vec - scalar).abs().max()}"
    t = state.tensors()
    truth = N._nf4_linear_ref(x.double(), *t, n_out, 64, None, None, None, 0.5)
    assert_within_rule(f"gemv {dtype} unaligned x", K.nf4_linear(shifted, *t, n_out, 64, None, None, None, 0.5),
                       N._nf4_linear_ref(x, *t, n_out, 64, None, None, None, 0.5), truth)


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


def _offset_rows(t, extra):
    """t's values in rows `extra` elements longer than t's: unit column stride, row stride not a multiple of
    a 16-byte vector (the kernels' scalar paths)."""
    wide = torch.empty(t.shape[0], t.shape[1] + extra, dtype=t.dtype)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_tokens=st.sampled_from([1, 2, 3, 5, 40, 64]), n_slots=st.integers(1, 4),
       max_rank=st.sampled_from([1, 7, 16, 26, 64, 80, 130]), n_in=st.sampled_from([8, 100, 1030, 2500, 4096]),
       n_out=st.sampled_from([1, 33, 200]), dtype=st.sampled_from(DTYPES), mix=st.sampled_from(MIXES),
       layout=st.sampled_from(["contiguous", "offset_rows"]), seed=st.integers(0, 2**16))
# batch 1 at rank 16, in 4096: `in` split over 4 blocks, 16-byte loads, a second pass adds the splits
@example(n_tokens=1, n_slots=2, max_rank=16, n_in=4096, n_out=200, dtype=torch.bfloat16, mix="distinct",
         layout="contiguous", seed=0)
# 3 splits of 1024, 1024, 452; scalar loads in fp16 (2500 % 8 != 0); the expand's 16 lanes per output
@example(n_tokens=3, n_slots=3, max_rank=80, n_in=2500, n_out=33, dtype=torch.float16, mix="with_none",
         layout="contiguous", seed=1)
# tokens x rank >= 1024: 4 rows of A per block (26 = 6 x 4 + 2), rows at an odd stride (scalar loads)
@example(n_tokens=40, n_slots=3, max_rank=26, n_in=100, n_out=200, dtype=torch.float32, mix="uniform",
         layout="offset_rows", seed=2)
@example(n_tokens=64, n_slots=2, max_rank=16, n_in=1030, n_out=33, dtype=torch.bfloat16, mix="zipf1.5",
         layout="contiguous", seed=3)
# 16-byte loads with 4 rows per block; and over 3 splits of 840, 840, 820 (the last share shorter)
@example(n_tokens=64, n_slots=3, max_rank=16, n_in=100, n_out=200, dtype=torch.float32, mix="skewed",
         layout="contiguous", seed=4)
@example(n_tokens=3, n_slots=2, max_rank=16, n_in=2500, n_out=1, dtype=torch.float32, mix="identical",
         layout="contiguous", seed=5)
def test_bgmv_split_and_vector_paths(K, n_tokens, n_slots, max_rank, n_in, n_out, dtype, mix, layout, seed):
    """The BGMV kernels' paths: `in` split across a block and (few tokens) across blocks with a second
    pass, 1 or 4 rows of A per block, 16-byte or scalar loads (in or the row stride not a multiple of the
    vector, rank past the vector), the expand's lane groups of 1..32 threads per output; rank 1..130."""
    x, A, B, idx, ranks, scales, out0 = _multi_inputs(n_tokens, n_slots, max_rank, n_in, n_out, dtype, mix, False,
                                                      seed)
    if layout == "offset_rows":
        x, out0 = _offset_rows(x, 1), _offset_rows(out0, 3)
    check_multi_lora(K, x, A, B, idx, ranks, scales, out0)


def _segments(n_tokens, lengths):
    """seg_starts for segments of the given lengths, the last one taking the rest of the tokens."""
    bounds = [0]
    for n in lengths:
        bounds.append(min(n_tokens, bounds[-1] + n))
    bounds.append(n_tokens)
    return torch.tensor(bounds, dtype=torch.int64)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_tokens=st.integers(0, 100), n_slots=st.integers(1, 4), max_rank=st.sampled_from([1, 5, 16, 17, 40, 80]),
       n_in=st.sampled_from([1, 64, 130]), n_out=st.sampled_from([1, 64, 150]), dtype=st.sampled_from(DTYPES),
       lengths=st.lists(st.integers(0, 70), max_size=4), layout=st.sampled_from(["contiguous", "offset_rows"]),
       seed=st.integers(0, 2**16))
# one 70-token segment (tiles of 32, 32, 6) then an empty one and 30 tokens; ranks past one tile of 16
@example(n_tokens=100, n_slots=3, max_rank=40, n_in=130, n_out=150, dtype=torch.bfloat16, lengths=[70, 0],
         layout="contiguous", seed=0)
@example(n_tokens=33, n_slots=2, max_rank=80, n_in=64, n_out=64, dtype=torch.float32, lengths=[0, 32],
         layout="offset_rows", seed=1)
def test_sgmv_grouped_gemm_tiles(K, n_tokens, n_slots, max_rank, n_in, n_out, dtype, lengths, layout, seed):
    """SGMV's grouped GEMM: tiles of 32 tokens within each segment (segments longer than a tile, partial
    and empty ones), tiles of 16 rows of A / 64 outputs and stages of 64 of `in` / 16 of the rank, all
    with remainders; segments without adapter (-1); rows at an odd stride."""
    x, A, B, _, ranks, scales, out0 = _multi_inputs(n_tokens, n_slots, max_rank, n_in, n_out, dtype, "uniform",
                                                    False, seed)
    if layout == "offset_rows":
        x, out0 = _offset_rows(x, 1), _offset_rows(out0, 3)
    starts = _segments(n_tokens, lengths)
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


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("tokens,n_out", [(64, 33), (65, 1), (129, 70), (200, 40)])
def test_dora_grad_token_blocks(K, dtype, tokens, n_out):
    """The gradient kernel's 2-D grid: blocks of 64 tokens (one full block, one and a token, three with a
    partial last one) whose partial sums of dm a second pass adds in block order; run twice, the same bits."""
    check_dora(K, tokens, 48, n_out, 8, dtype, 0.5, bias=False)
    g = torch.Generator().manual_seed(5)
    dy, u = torch.randn(tokens, n_out, generator=g).to(dtype), torch.randn(tokens, n_out, generator=g).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gain, norm = torch.rand(n_out, generator=g).to(acc) + 0.5, torch.rand(n_out, generator=g).to(acc) + 0.5
    runs = []
    for _ in range(2):
        du, dm = torch.empty_like(dy), torch.empty_like(norm)
        K._call("lb_dora_grad", dy.data_ptr(), u.data_ptr(), gain.data_ptr(), norm.data_ptr(), du.data_ptr(),
                dm.data_ptr(), tokens, n_out, H.DTYPE_CODE[dtype])
        runs.append((du, dm))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), "not deterministic"
    truth = (dy.double() * u.double()).sum(0) / norm.double()
    torch.testing.assert_close(runs[0][1].double(), truth, rtol=1e-5 if acc == torch.float32 else 1e-12, atol=1e-5)
    assert torch.equal(runs[0][0], (dy.to(acc) * gain).to(dtype))


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
    "gemv: x's 16-byte vectors loaded into each other's places": (
        "nf4_int4.cu", "for (int v = 0; v < 32 / n; ++v) load16(src + v * n, dst + v * n);",
        "for (int v = 0; v < 32 / n; ++v) load16(src + v * n, dst + (v ^ 1) * n);"),
    "bgmv shrink: one row past the rank": (
        "bgmv.cu", "const int64_t rows = r - j0 < 0 ? 0 : (r - j0 > ROWS ? ROWS : r - j0);",
        "const int64_t rows = r - j0 < 0 ? 0 : (r - j0 > ROWS ? ROWS : r - j0 + 1);"),
    "bgmv shrink: the second pass leaves out the first split of `in`": (
        "bgmv.cu", "for (int64_t s = 0; s < splits; ++s) sum +=", "for (int64_t s = 1; s < splits; ++s) sum +="),
    "bgmv expand: the lane group's reduction stops halfway": (
        "bgmv.cu", "for (int offset = lanes / 2; offset > 0; offset /= 2) acc +=",
        "for (int offset = lanes / 4; offset > 0; offset /= 2) acc +="),
    "sgmv: a segment's last tile one token short": (
        "bgmv.cu", "found[2] = found[1] + kTileM < b ? found[1] + kTileM : b;",
        "found[2] = found[1] + kTileM < b ? found[1] + kTileM : b - 1;"),
    "sgmv shrink: the second half of a tile's tokens reads the first half's x": (
        "bgmv.cu", "acc[1] = fmaf(xs[tm + 16][kk], av, acc[1]);", "acc[1] = fmaf(xs[tm][kk], av, acc[1]);"),
    "sgmv expand: reads one column past the rank": (
        "bgmv.cu", "bs[nn][kk] = (o < p.out_features && j < r)", "bs[nn][kk] = (o < p.out_features && j <= r)"),
    "dora norm: cancellation rows not recomputed": (
        "lora.cu", "if (sq < static_cast<A>(p.cancellation) * (w_sq + s * s * ba_sq)) {", "if (false) {"),
    "dora grad: one row of threads left out of the reduction": (
        "lora.cu", "for (int r = 1; r < blockDim.y; ++r) acc += part[r][threadIdx.x];",
        "for (int r = 2; r < blockDim.y; ++r) acc += part[r][threadIdx.x];"),
    "dora epilogue: bias of column 0 for all": (
        "lora.cu", "if (bias) v += to_acc(bias[j]);", "if (bias) v += to_acc(bias[0]);"),
    "dora grad: the second pass leaves out the first block of tokens": (
        "lora.cu", "for (int64_t b = 0; b < blocks; ++b) acc +=", "for (int64_t b = 1; b < blocks; ++b) acc +="),
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
    # BGMV at 2 tokens, in 2048: 16-byte loads, `in` split over two blocks; the expand's lane groups
    check_multi_lora(K, *_multi_inputs(2, 2, 16, 2048, 40, torch.bfloat16, "distinct", False, 2))
    # SGMV over tiles: a 40-token segment (tiles of 32 and 8), ranks up to 20 (two tiles of 16 rows)
    x, A, B, _, ranks, scales, out0 = _multi_inputs(70, 3, 20, 130, 100, torch.float32, "uniform", False, 3)
    starts, seg_idx = torch.tensor([0, 40, 40, 45, 70]), torch.tensor([0, 2, 1, 2])
    check_multi_lora(K, x, A, B, seg_idx.repeat_interleave(starts.diff()), ranks, scales, out0, seg=(starts, seg_idx))
    check_dora(K, 33, 300, 70, 16, torch.float32, 2.0, bias=True)
    check_dora(K, 130, 40, 50, 4, torch.float32, 0.5)  # three blocks of tokens in the gradient kernel
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
