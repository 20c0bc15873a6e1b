"""lorabench::dora_linear (DoRA, arXiv 2402.09353): backends against an fp64 truth, against PEFT's
DoraLinearLayer on the same weights, gradients (norm detached, sec. 4.3), opcheck."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lorabench.ops import dora_linear
from lorabench.ops import lora as L
from lorabench.ops import reference
from tests.kernels.conftest import DTYPES, REAL_SIZES, assert_within_rule, backend_params, device_of
from tests.kernels.test_lora_linear import LAYOUTS, RANKS, eps_for, make_inputs


def make_dora_inputs(tokens, n_in, n_out, rank, dtype, device, seed=0, **kw):
    """LoRA inputs with ||s B_j A|| <= ||W_j|| / 2 for every row and s <= 2, as in a trained adapter:
    then ||W_j + s B_j A|| >= ||W_j|| / 2 (triangle inequality). Where s B_j A can cancel W_j the norm
    is ill-conditioned and a bf16 reference no yardstick; test_norm_under_cancellation covers it."""
    x, W, b, A, B, mask, dy = make_inputs(tokens, n_in, n_out, rank, dtype, device, seed=seed, **kw)
    ratio = 2.0 * torch.linalg.norm(B.double() @ A.double(), dim=1) / torch.linalg.norm(W.double(), dim=1)
    B = (B.double() * (0.5 / ratio.clamp_min(0.5)).unsqueeze(1)).to(dtype)  # rows scaled down where needed
    g = torch.Generator().manual_seed(seed + 1)
    m = (torch.rand(n_out, generator=g) + 0.5).to(dtype=dtype, device=device)
    return x, W, b, A, B, m, mask, dy


def reference_with_grads(x, W, b, A, B, m, scale, mask, dy, dtype):
    x, A, B, m = (t.detach().to(dtype).requires_grad_() for t in (x, A, B, m))
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    y = reference.dora_linear(x, W.to(dtype), cast(b), A, B, m, scale, cast(mask))
    return (y.detach(), *torch.autograd.grad(y, (x, A, B, m), dy.to(dtype)))


def run_backend(backend, x, W, b, A, B, m, scale, mask, dy):
    if backend == "reference":
        fwd, bwd = L._dora_linear_ref, L._dora_linear_backward_ref
    else:
        fwd, bwd = torch.ops.lorabench.dora_linear, torch.ops.lorabench.dora_linear_backward
    y, xa, u, norm = fwd(x, W, b, A, B, m, scale, mask)
    return (y, *bwd(dy, x, W, A, B, m, xa, u, norm, scale, mask, True))


def check_against_truth(backend, tokens, n_in, n_out, rank, dtype, scale, **kw):
    x, W, b, A, B, m, mask, dy = make_dora_inputs(tokens, n_in, n_out, rank, dtype, device_of(backend), **kw)
    got = run_backend(backend, x, W, b, A, B, m, scale, mask, dy)
    truth = reference_with_grads(x, W, b, A, B, m, scale, mask, dy, torch.float64)
    lowp = reference_with_grads(x, W, b, A, B, m, scale, mask, dy, dtype)
    for name, g_, l_, t_ in zip(("y", "dx", "dA", "dB", "dm"), got, lowp, truth):
        assert_within_rule(f"{backend} {dtype} {name}", g_, l_, t_, eps_for(dtype))


@pytest.mark.parametrize("backend", backend_params())
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=st.sampled_from([0, 1, 2, 3, 7, 16, 33]), n_in=st.integers(1, 160), n_out=st.integers(1, 160),
       rank=st.sampled_from(RANKS), dtype=st.sampled_from(DTYPES), scale=st.sampled_from([0.0, 0.5, 2.0]),
       bias=st.booleans(), dropout=st.booleans(), layout=st.sampled_from(LAYOUTS))
# One input feature (found by hypothesis before B was scaled down: the expanded norm cancelled).
@example(tokens=1, n_in=1, n_out=3, rank=1, dtype=torch.bfloat16, scale=0.5, bias=False, dropout=False,
         layout="contiguous")
@example(tokens=0, n_in=1, n_out=50, rank=1, dtype=torch.float16, scale=2.0, bias=False, dropout=False,
         layout="contiguous")
def test_matches_reference(backend, tokens, n_in, n_out, rank, dtype, scale, bias, dropout, layout):
    check_against_truth(backend, tokens, n_in, n_out, rank, dtype, scale, bias=bias, dropout=dropout,
                        layout=layout)


@pytest.mark.parametrize("backend", backend_params(("cpu", "cuda")))
@pytest.mark.parametrize("n_in,n_out", REAL_SIZES[:4] + [(4096, 11008)])
def test_real_model_sizes(backend, n_in, n_out):
    check_against_truth(backend, 5, n_in, n_out, 16, torch.float32, 2.0, bias=True)


@pytest.mark.parametrize("backend", backend_params(("cpu",)))
@pytest.mark.parametrize("tokens,rank", [(127, 8), (128, 8), (300, 4), (300, 16)])
def test_narrow_products_both_orientations(backend, tokens, rank):
    """The CPU kernels take x A^T, du B and dB transposed by tokens and rank (BLAS speed): both sides."""
    check_against_truth(backend, tokens, 96, 130, rank, torch.float32, 2.0, bias=True, dropout=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_norm_without_materialising_matches_the_formed_matrix(dtype):
    _, W, _, A, B, _, _, _ = make_dora_inputs(1, 300, 70, 16, dtype, "cpu")
    truth = torch.linalg.norm(W.double() + 1.5 * (B.double() @ A.double()), dim=1)
    lowp = torch.linalg.norm(W + 1.5 * (B @ A), dim=1)
    for name, got in (("reference", L._dora_norm(W, A, B, 1.5)),
                      ("op", torch.ops.lorabench.dora_linear(W[:0], W, None, A, B, W[:, 0], 1.5, None)[3])):
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_within_rule(name, got.to(dtype), lowp, truth, 1e-6)


@pytest.mark.parametrize("backend", ["reference", "op"])
def test_norm_under_cancellation(backend):
    """W_j = -s B_j A + a small remainder: ||W_j||^2 + 2 s <W_j, (BA)_j> + s^2 ||(BA)_j||^2 cancels to
    ~1e-6 of its terms; the kernels detect it and recompute those rows from the formed row."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(8, 64, generator=g), torch.randn(40, 8, generator=g)
    W = -1.5 * B @ A
    W[::2] += 1e-3 * torch.randn(20, 64, generator=g)  # even rows nearly cancel, odd rows exactly
    truth = torch.linalg.norm(W.double() + 1.5 * (B.double() @ A.double()), dim=1)
    got = (L._dora_norm(W, A, B, 1.5) if backend == "reference"
           else torch.ops.lorabench.dora_linear(W[:0], W, None, A, B, W[:, 0], 1.5, None)[3])
    torch.testing.assert_close(got.double(), truth, rtol=1e-2, atol=1e-4)


def _peft_dora_layer(n_in, n_out, rank, alpha, dtype=torch.float32, seed=0):
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(n_in, n_out)

    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["lin"], use_dora=True, lora_dropout=0.0)
    model = peft.get_peft_model(Net(), cfg).to(dtype)
    layer = model.base_model.model.lin
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained-looking adapter: B != 0, magnitude off its initial norm
        layer.lora_B["default"].weight.copy_(torch.randn(n_out, rank, generator=g) / rank)
        layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.3 * torch.rand(n_out, generator=g))
    return model, layer


@pytest.mark.parametrize("kernel", ["fused", "reference"])
@pytest.mark.parametrize("training", [False, True])
def test_matches_peft_dora_forward_and_grads(kernel, training):
    model, layer = _peft_dora_layer(48, 40, 8, 16)
    model.train(training)
    base = layer.base_layer
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    scale = layer.scaling["default"]
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(3), requires_grad=True)
    dy = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(4))

    y_peft = layer(x)
    peft_grads = torch.autograd.grad(y_peft, (x, A, B, m), dy)
    ours_x = x.detach().clone().requires_grad_()
    ours = [t.detach().clone().requires_grad_() for t in (A, B, m)]
    y = dora_linear(ours_x, base.weight, base.bias, *ours[:2], ours[2], scale, dropout_p=0.0, training=training,
                    kernel=kernel)
    ours_grads = torch.autograd.grad(y, (ours_x, *ours), dy)
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("dx", "dA", "dB", "dm"), ours_grads, peft_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_gradcheck_float64_x_and_magnitude():
    """gradcheck by finite differences sees the norm move with A and B, which the detached norm
    (sec. 4.3) ignores by design: x and m are checked by gradcheck, A and B against autograd
    through the reference (same detach) below."""
    x, W, b, A, B, m, _, _ = make_dora_inputs(6, 5, 4, 3, torch.float64, "cpu")
    x = x.reshape(2, 3, 5).requires_grad_()
    m.requires_grad_()
    for p in (0.0, 0.4):
        assert torch.autograd.gradcheck(
            lambda x, m: dora_linear(x, W, b, A, B, m, 0.7, dropout_p=p, training=True,
                                     generator=torch.Generator().manual_seed(7)), (x, m))


@pytest.mark.parametrize("dropout", [False, True])
def test_float64_grads_equal_reference_autograd(dropout):
    x, W, b, A, B, m, mask, dy = make_dora_inputs(7, 19, 11, 4, torch.float64, "cpu", dropout=dropout)
    got = run_backend("cpu" if L.extension() else "reference", x, W, b, A, B, m, 0.7, mask, dy)
    want = reference_with_grads(x, W, b, A, B, m, 0.7, mask, dy, torch.float64)
    for name, a, b_ in zip(("y", "dx", "dA", "dB", "dm"), got, want):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10, msg=name)


def test_dropout_fused_equals_reference_with_one_generator():
    x, W, b, A, B, m, _, _ = make_dora_inputs(6, 29, 31, 4, torch.float32, "cpu")

    def run(kernel, seed):
        xs, As, Bs, ms = (t.detach().clone().requires_grad_() for t in (x, A, B, m))
        y = dora_linear(xs, W, b, As, Bs, ms, 0.5, dropout_p=0.3, training=True, kernel=kernel,
                        generator=torch.Generator().manual_seed(seed))
        return (y.detach(), *torch.autograd.grad(y, (xs, As, Bs, ms), torch.ones_like(y) + y.detach()))

    for name, f, r in zip(("y", "dx", "dA", "dB", "dm"), run("fused", 5), run("reference", 5)):
        torch.testing.assert_close(f, r, msg=name)
    assert not torch.allclose(run("fused", 6)[0], run("fused", 5)[0])


@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_dropout_p0_is_no_dropout(kernel):
    x, W, b, A, B, m, _, _ = make_dora_inputs(6, 29, 31, 4, torch.float32, "cpu")
    torch.testing.assert_close(dora_linear(x, W, b, A, B, m, 0.5, dropout_p=0.0, training=True, kernel=kernel),
                               dora_linear(x, W, b, A, B, m, 0.5, kernel=kernel), rtol=0, atol=0)


@pytest.mark.parametrize("op", ["dora_linear", "dora_linear_backward"])
@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck(op, dropout):
    x, W, b, A, B, m, mask, dy = make_dora_inputs(5, 12, 7, 3, torch.float32, "cpu", dropout=dropout)
    if op == "dora_linear":
        args = (x, W, b, A, B, m, 0.5, mask)
    else:
        _, xa, u, norm = torch.ops.lorabench.dora_linear(x, W, b, A, B, m, 0.5, mask)
        args = (dy, x, W, A, B, m, xa, u, norm, 0.5, mask, True)
    torch.library.opcheck(getattr(torch.ops.lorabench, op).default, args)


def test_bad_magnitude_gets_a_clear_error():
    x, W, b, A, B, m, _, _ = make_dora_inputs(4, 8, 6, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"magnitude must be \(out=6,\)"):
        dora_linear(x, W, b, A, B, m[:5], 1.0)


@pytest.mark.parametrize("dropout", [False, True])
def test_python_autograd_function(dropout):
    """DoraLinearFunction (the autograd without the extension): gradcheck for x and m, A and B against
    autograd through the reference (the detached norm, see test_gradcheck_float64_x_and_magnitude)."""
    x, W, b, A, B, m, mask, dy = make_dora_inputs(6, 5, 4, 3, torch.float64, "cpu", dropout=dropout)
    x.requires_grad_(), m.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, m: L.DoraLinearFunction.apply(x, W, b, A, B, m, 0.7, mask), (x, m))
    A_, B_ = A.clone().requires_grad_(), B.clone().requires_grad_()
    got = torch.autograd.grad(L.DoraLinearFunction.apply(x, W, b, A_, B_, m, 0.7, mask), (A_, B_), dy)
    want = reference_with_grads(x, W, b, A, B, m, 0.7, mask, dy, torch.float64)[2:4]
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", backend_params(("cpu", "cuda")))
def test_bias_of_another_dtype_is_refused(backend):
    """The compiled op reads bias as x's dtype (a raw pointer in the CUDA epilogue): a float64 bias beside
    float32 x is refused on every backend with the same message, never misread."""
    x, W, b, A, B, m, _, _ = make_dora_inputs(3, 16, 8, 2, torch.float32, device_of(backend))
    with pytest.raises(RuntimeError, match="bias.dtype is Double but x.dtype is Float"):
        torch.ops.lorabench.dora_linear(x, W, b.double(), A, B, m, 1.0, None)
