"""BGMV / SGMV (lorabench/ops/multi_lora.py): every backend against the reference and an fp64 truth.

Tolerance: conftest.assert_within_rule (a backend's error against the fp64 truth is at most twice the
error of PyTorch's own computation in the same precision, plus a small epsilon). Slots are filled with NaN
past each adapter's rank: a kernel that reads a row or column past the rank returns NaN and fails.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lorabench.ops import available_backends, multi_lora, reference
from tests.kernels.conftest import DTYPES, assert_within_rule, backend_params, device_of

BACKENDS = backend_params()
MIXES = ["distinct", "uniform", "zipf1.5", "identical", "skewed", "with_none"]
# Real hidden sizes (and MLP widths divided by a tensor-parallel degree, as vLLM's tests sweep them).
HIDDEN_SIZES = [576, 896, 1024, 2048, 2304, 3072, 4096, 5120, 5504, 7168, 8192]
RANKS = [1, 2, 8, 16, 32, 64, 128, 256]


def draw_indices(mix: str, n_tokens: int, n_slots: int, g: torch.Generator) -> torch.Tensor:
    """Adapter popularity mixes of a serving batch (slot per token, -1 = no adapter)."""
    if mix == "distinct":  # every token its own adapter (as many as there are slots)
        return torch.randperm(max(n_tokens, n_slots), generator=g)[:n_tokens] % n_slots
    if mix == "uniform":
        return torch.randint(0, n_slots, (n_tokens,), generator=g)
    if mix == "zipf1.5":  # P(k) ~ k^-1.5 (S-LoRA's power-law popularity)
        p = torch.arange(1, n_slots + 1, dtype=torch.float64) ** -1.5
        return torch.multinomial(p / p.sum(), n_tokens, replacement=True, generator=g) if n_tokens else \
            torch.zeros(0, dtype=torch.int64)
    if mix == "identical":
        return torch.full((n_tokens,), n_slots - 1, dtype=torch.int64)
    if mix == "skewed":  # 90% of the tokens on one adapter
        hot = torch.rand(n_tokens, generator=g) < 0.9
        return torch.where(hot, 0, torch.randint(0, n_slots, (n_tokens,), generator=g))
    if mix == "with_none":
        idx = torch.randint(0, n_slots, (n_tokens,), generator=g)
        return torch.where(torch.rand(n_tokens, generator=g) < 0.3, -1, idx)
    raise AssertionError(mix)


def make_slots(n_slots, max_rank, n_in, n_out, ranks, dtype, g, device="cpu"):
    """A (L, R, in), B (L, out, R) with NaN past each slot's rank, ranks (L,), scales (L,)."""
    A = torch.randn(n_slots, max_rank, n_in, generator=g) / n_in ** 0.5
    B = torch.randn(n_slots, n_out, max_rank, generator=g) / max_rank ** 0.5
    for l, r in enumerate(ranks):
        A[l, r:], B[l, :, r:] = float("nan"), float("nan")
    scales = torch.rand(n_slots, generator=g) + 0.5
    to = dict(device=device)
    return (A.to(dtype).to(**to), B.to(dtype).to(**to), torch.tensor(ranks, dtype=torch.int64, **to), scales.to(**to))


def _gathered(W, idx, ranks, rank_dim):
    """W[idx[i]] per token with everything past the rank (and tokens without adapter) set to 0."""
    l = idx.clamp(min=0)
    Wt = W[l]  # (T, ...)
    keep = (torch.arange(W.shape[rank_dim], device=W.device)[None, :] < ranks[l][:, None]) & (idx[:, None] >= 0)
    shape = [keep.shape[0]] + [1] * (Wt.dim() - 1)
    shape[rank_dim] = keep.shape[1]
    return torch.where(keep.view(shape), Wt, torch.zeros((), dtype=W.dtype, device=W.device))


def truth_shrink(x, A, idx, ranks, scales, compute=torch.float64):
    """y[i, :r] = s x[i] A[l, :r]^T computed in `compute` (fp64: the truth; the input dtype: PyTorch's own)."""
    Al = _gathered(A, idx, ranks, 1).to(compute)  # (T, R, in)
    s = scales[idx.clamp(min=0)]
    return torch.einsum("ti,tri->tr", x.to(compute), Al) * (s.double() if compute == torch.float64 else s)[:, None]


def truth_expand(out, y, B, idx, ranks, compute=torch.float64):
    Bl = _gathered(B, idx, ranks, 2).to(compute)  # (T, out, R)
    return out.to(compute) + torch.einsum("tr,tor->to", y.to(compute), Bl)


def check_bgmv(backend, x, A, B, idx, ranks, scales, out0):
    y = multi_lora.bgmv_shrink(x, A, idx, ranks, scales, backend=backend)
    assert y.shape == (x.shape[0], A.shape[1]) and y.dtype == torch.float32 and y.device == x.device
    native_dtype = x.dtype if x.dtype != torch.float32 else torch.float32
    assert_within_rule(f"bgmv_shrink {backend} {x.dtype}", y, truth_shrink(x, A, idx, ranks, scales, native_dtype),
                       truth_shrink(x, A, idx, ranks, scales))
    out = out0.clone()
    res = multi_lora.bgmv_expand(out, y, B, idx, ranks, backend=backend)
    assert res is out and out.dtype == out0.dtype
    assert_within_rule(f"bgmv_expand {backend} {x.dtype}", out,
                       truth_expand(out0, y, B, idx, ranks, native_dtype).to(out0.dtype),
                       truth_expand(out0, y, B, idx, ranks))
    untouched = idx < 0
    assert torch.equal(out[untouched], out0[untouched]), "a token without adapter was changed"
    return y, out


@st.composite
def bgmv_cases(draw):
    return dict(n_tokens=draw(st.integers(0, 40)), n_slots=draw(st.integers(1, 6)),
                max_rank=draw(st.integers(1, 40)), n_in=draw(st.integers(1, 97)), n_out=draw(st.integers(1, 81)),
                dtype=draw(st.sampled_from(DTYPES)), mix=draw(st.sampled_from(MIXES)),
                noncontig=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _build(case, device):
    g = torch.Generator().manual_seed(case["seed"])
    L, R = case["n_slots"], case["max_rank"]
    ranks = torch.randint(1, R + 1, (L,), generator=g).tolist()
    A, B, ranks_t, scales = make_slots(L, R, case["n_in"], case["n_out"], ranks, case["dtype"], g, device)
    T = case["n_tokens"]
    if case["noncontig"]:  # every other column of a wider tensor: row stride != in
        x = torch.randn(T, 2 * case["n_in"], generator=g).to(case["dtype"]).to(device)[:, ::2]
    else:
        x = torch.randn(T, case["n_in"], generator=g).to(case["dtype"]).to(device)
    idx = draw_indices(case["mix"], T, L, g).to(device)
    out0 = torch.randn(T, case["n_out"], generator=g).to(case["dtype"]).to(device)
    return x, A, B, idx, ranks_t, scales, out0


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=bgmv_cases())
@example(case=dict(n_tokens=0, n_slots=1, max_rank=1, n_in=1, n_out=1, dtype=torch.float32, mix="uniform",
                   noncontig=False, seed=0))
@example(case=dict(n_tokens=1, n_slots=1, max_rank=1, n_in=1, n_out=1, dtype=torch.bfloat16, mix="identical",
                   noncontig=True, seed=1))
def test_bgmv_matches_truth(backend, case):
    check_bgmv(backend, *_build(case, device_of(backend)))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=bgmv_cases(), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_sgmv_is_bgmv_after_repeat_interleave(backend, case, cuts):
    x, A, B, _, ranks, scales, out0 = _build(case, device_of(backend))
    T, L = x.shape[0], A.shape[0]
    starts = torch.tensor(sorted({0, T, *[min(c, T) for c in cuts]}) if T else [0, 0], dtype=torch.int64)
    if len(cuts) % 2:  # an empty segment in the middle
        starts = torch.cat([starts[:1], starts]) if T else starts
    g = torch.Generator().manual_seed(case["seed"] + 1)
    seg_idx = torch.randint(-1, L, (starts.numel() - 1,), generator=g)
    starts, seg_idx = starts.to(x.device), seg_idx.to(x.device)
    idx = seg_idx.repeat_interleave(starts.diff())  # SGMV = BGMV after repeat_interleave
    y_b, out_b = check_bgmv(backend, x, A, B, idx, ranks, scales, out0)
    y_s = multi_lora.sgmv_shrink(x, A, starts, seg_idx, ranks, scales, backend=backend)
    out_s = multi_lora.sgmv_expand(out0.clone(), y_s, B, starts, seg_idx, ranks, backend=backend)
    torch.testing.assert_close(y_s, y_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_s, out_b, rtol=1e-5, atol=1e-5) if x.dtype == torch.float32 else \
        torch.testing.assert_close(out_s.float(), out_b.float(), rtol=1e-2, atol=1e-2)


def _sweep(backend, n_in, n_out, ranks, max_rank, mix, dtype, n_tokens=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    device = device_of(backend)
    A, B, ranks_t, scales = make_slots(len(ranks), max_rank, n_in, n_out, ranks, dtype, g, device)
    x = torch.randn(n_tokens, n_in, generator=g).to(dtype).to(device)
    idx = draw_indices(mix, n_tokens, len(ranks), g).to(device)
    out0 = torch.randn(n_tokens, n_out, generator=g).to(dtype).to(device)
    check_bgmv(backend, x, A, B, idx, ranks_t, scales, out0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_real_hidden_sizes(backend, hidden):
    # Shrink reads (hidden -> r), expand writes (r -> hidden): both directions at each real size.
    _sweep(backend, hidden, hidden, ranks=[16, 8, 1, 16], max_rank=16, mix="uniform", dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", RANKS)
def test_ranks(backend, rank):
    _sweep(backend, 4096, 1024, ranks=[rank, rank], max_rank=rank, mix="distinct", dtype=torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix,dtype", [(m, DTYPES[i % 3]) for i, m in enumerate(MIXES)] + [("uniform", torch.float32)])
def test_heterogeneous_ranks_1_to_256_in_one_batch(backend, dtype, mix):
    ranks = [1, 2, 3, 7, 8, 15, 16, 17, 31, 64, 100, 128, 129, 200, 255, 256]
    _sweep(backend, 512, 384, ranks=ranks, max_rank=256, mix=mix, dtype=dtype, n_tokens=48)


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_past_the_rank_are_zero(backend):
    g = torch.Generator().manual_seed(3)
    A, B, ranks, scales = make_slots(3, 32, 40, 24, [1, 17, 32], torch.float32, g, device_of(backend))
    x = torch.randn(9, 40, generator=g).to(A.device)
    idx = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1, 1], device=A.device)
    y = multi_lora.bgmv_shrink(x, A, idx, ranks, scales, backend=backend)
    for i, l in enumerate(idx.tolist()):
        r = int(ranks[l]) if l >= 0 else 0
        assert torch.all(y[i, r:] == 0) and (r == 0 or torch.all(y[i, :r] != 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_named(backend):
    device = device_of(backend)
    g = torch.Generator().manual_seed(0)
    A, B, ranks, scales = make_slots(2, 4, 8, 8, [4, 2], torch.float32, g, device)
    x = torch.randn(3, 8, device=device)
    with pytest.raises(Exception, match="idx must be int64"):
        multi_lora.bgmv_shrink(x, A, torch.zeros(3, dtype=torch.int32, device=device), ranks, scales, backend=backend)
    with pytest.raises(Exception, match="x has in = 7"):
        multi_lora.bgmv_shrink(x[:, :7], A, torch.zeros(3, dtype=torch.int64, device=device), ranks, scales,
                               backend=backend)
    with pytest.raises(Exception, match="x is .*(Half|float16).* but A is"):
        multi_lora.bgmv_shrink(x.half(), A, torch.zeros(3, dtype=torch.int64, device=device), ranks, scales,
                               backend=backend)
    if device == "cpu":  # index values are checked where reading them costs no device sync
        with pytest.raises((ValueError, RuntimeError), match="out of range"):
            multi_lora.bgmv_shrink(x, A, torch.tensor([0, 2, -1], device=device), ranks, scales, backend=backend)
        with pytest.raises((ValueError, RuntimeError), match="rank"):
            multi_lora.bgmv_shrink(x, A, torch.tensor([0, 1, -1]), torch.tensor([4, 5]), scales, backend=backend)
        with pytest.raises((ValueError, RuntimeError), match="seg_starts must"):
            multi_lora.sgmv_shrink(x, A, torch.tensor([0, 2]), torch.tensor([1]), ranks, scales, backend=backend)


def test_unknown_backend_is_named():
    x = torch.randn(1, 2)
    with pytest.raises(ValueError, match="Unknown backend 'cdua'"):
        multi_lora.bgmv_shrink(x, torch.randn(1, 1, 2), torch.zeros(1, dtype=torch.int64),
                               torch.ones(1, dtype=torch.int64), torch.ones(1), backend="cdua")


@pytest.mark.skipif(not available_backends()["cpu"][0], reason=available_backends()["cpu"][1])
def test_opcheck():
    g = torch.Generator().manual_seed(0)
    A, B, ranks, scales = make_slots(3, 8, 16, 12, [8, 3, 5], torch.float32, g)
    A, B = A.nan_to_num(), B.nan_to_num()  # opcheck compares runs; NaN != NaN
    x, idx = torch.randn(5, 16, generator=g), torch.tensor([0, 2, -1, 1, 0])
    y = torch.ops.lorabench.bgmv_shrink(x, A, idx, ranks, scales)
    starts, seg_idx = torch.tensor([0, 2, 5]), torch.tensor([1, 0])
    torch.library.opcheck(torch.ops.lorabench.bgmv_shrink, (x, A, idx, ranks, scales))
    torch.library.opcheck(torch.ops.lorabench.bgmv_expand, (torch.randn(5, 12), y, B, idx, ranks))
    torch.library.opcheck(torch.ops.lorabench.sgmv_shrink, (x, A, starts, seg_idx, ranks, scales))
    torch.library.opcheck(torch.ops.lorabench.sgmv_expand, (torch.randn(5, 12), y, B, starts, seg_idx, ranks))


def test_reference_reads_like_the_math():
    # One token, one adapter: y = s x A^T and out + y B^T, nothing more.
    x, A, B = torch.randn(1, 6), torch.randn(1, 4, 6), torch.randn(1, 5, 4)
    idx, ranks, s = torch.tensor([0]), torch.tensor([4]), torch.tensor([0.5])
    y = reference.bgmv_shrink(x, A, idx, ranks, s)
    torch.testing.assert_close(y, 0.5 * x @ A[0].T)
    out = reference.bgmv_expand(torch.zeros(1, 5), y, B, idx, ranks)
    torch.testing.assert_close(out, 0.5 * x @ A[0].T @ B[0].T)


@pytest.mark.skipif(not available_backends()["cuda"][0], reason=available_backends()["cuda"][1])
def test_cuda_refuses_tensors_on_another_device():
    """A CPU ranks (or idx, scales, segments) beside a CUDA x gets a clear error naming the tensor, not an
    illegal memory access later (csrc/multi_lora_ops.cpp, check_device)."""
    g = torch.Generator().manual_seed(0)
    A, B, ranks, scales = make_slots(2, 4, 8, 8, [4, 2], torch.float32, g, "cuda")
    x, idx = torch.randn(3, 8, device="cuda"), torch.tensor([0, 1, -1], device="cuda")
    for name, args in (("ranks", (x, A, idx, ranks.cpu(), scales)), ("idx", (x, A, idx.cpu(), ranks, scales)),
                       ("scales", (x, A, idx, ranks, scales.cpu()))):
        with pytest.raises(RuntimeError, match=f"{name} is on cpu but x is on cuda"):
            torch.ops.lorabench.bgmv_shrink(*args)
    starts, seg_idx = torch.tensor([0, 2, 3]), torch.tensor([1, 0], device="cuda")
    with pytest.raises(RuntimeError, match="seg_starts is on cpu but x is on cuda"):
        torch.ops.lorabench.sgmv_shrink(x, A, starts, seg_idx, ranks, scales)
    y = torch.ops.lorabench.bgmv_shrink(x, A, idx, ranks, scales)
    with pytest.raises(RuntimeError, match="ranks is on cpu but out is on cuda"):
        torch.ops.lorabench.bgmv_expand(torch.zeros(3, 8, device="cuda"), y, B, idx, ranks.cpu())
