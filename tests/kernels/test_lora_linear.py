"""lorabench::lora_linear (lorabench/ops/lora.py): every backend against an fp64 truth, autograd, opcheck.

Backends: "reference" is the pure-PyTorch kernel registered as the fallback (what runs without the
extension), "cpu" the compiled C++ kernel, "cuda" the CUDA one (skipped without a GPU). The tolerance
rule is conftest.assert_within_rule: twice the low-precision reference's own error, plus epsilon.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorabench.ops import lora as L
from lorabench.ops import lora_linear, reference
from tests.kernels.conftest import DTYPES, REAL_SIZES, assert_within_rule, backend_params, device_of

RANKS = [1, 2, 3, 8, 16, 64, 256]
LAYOUTS = ["contiguous", "transposed", "strided"]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as t (2-D) in a non-contiguous memory layout."""
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "strided":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t


def make_inputs(tokens, n_in, n_out, rank, dtype, device, *, bias=True, dropout=False, layout="contiguous",
                seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g)
    W = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
    b = torch.randn(n_out, generator=g) if bias else None
    A = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
    B = torch.randn(n_out, rank, generator=g) / rank ** 0.5
    mask = L.dropout_mask(x, 0.25, g) if dropout else None
    dy = torch.randn(tokens, n_out, generator=g)
    to = dict(dtype=dtype, device=device)
    x, W = _layout(x.to(**to), layout), _layout(W.to(**to), layout)
    cast = lambda t: None if t is None else t.to(**to)  # noqa: E731
    return x, W, cast(b), cast(A), cast(B), cast(mask), cast(dy)


def reference_with_grads(x, W, b, A, B, scale, mask, dy, dtype):
    """y, dx, dA, dB of reference.lora_linear by autograd, computed in `dtype`."""
    x, A, B = (t.detach().to(dtype).requires_grad_() for t in (x, A, B))
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    y = reference.lora_linear(x, W.to(dtype), cast(b), A, B, scale, cast(mask))
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), dy.to(dtype))
    return y.detach(), dx, dA, dB


def run_backend(backend, x, W, b, A, B, scale, mask, dy):
    if backend == "reference":
        fwd, bwd = L._lora_linear_ref, L._lora_linear_backward_ref
    else:
        fwd, bwd = torch.ops.lorabench.lora_linear, torch.ops.lorabench.lora_linear_backward
    y, xa = fwd(x, W, b, A, B, scale, mask)
    dx, dA, dB = bwd(dy, x, W, A, B, xa, scale, mask, True)
    return y, dx, dA, dB


def eps_for(dtype):
    """The rule's floor, relative to max |truth|: 1e-5 in fp32; in bf16/fp16 four units of roundoff (2 eps),
    because an output goes through two or three roundings in the low-precision formula and the formula's own
    error, the rule's main term, can be near 0 by luck for a tiny output (hypothesis found n_out=1, rank 256,
    fp16: error 4.9e-3 against a bound of 4.3e-3 with a floor of one unit of roundoff)."""
    return 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps * 2


def check_against_truth(backend, tokens, n_in, n_out, rank, dtype, scale, **kw):
    inputs = make_inputs(tokens, n_in, n_out, rank, dtype, device_of(backend), **kw)
    x, W, b, A, B, mask, dy = inputs
    got = run_backend(backend, x, W, b, A, B, scale, mask, dy)
    truth = reference_with_grads(*inputs[:5], scale, mask, dy, torch.float64)
    lowp = reference_with_grads(*inputs[:5], scale, mask, dy, dtype)
    for name, g_, l_, t_ in zip(("y", "dx", "dA", "dB"), got, lowp, truth):
        assert_within_rule(f"{backend} {dtype} {name}", g_, l_, t_, eps_for(dtype))


@pytest.mark.parametrize("backend", backend_params())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=st.sampled_from([0, 1, 2, 3, 7, 16, 33]), n_in=st.integers(1, 160), n_out=st.integers(1, 160),
       rank=st.sampled_from(RANKS), dtype=st.sampled_from(DTYPES), scale=st.sampled_from([0.0, 0.5, 2.0]),
       bias=st.booleans(), dropout=st.booleans(), layout=st.sampled_from(LAYOUTS))
def test_matches_reference(backend, tokens, n_in, n_out, rank, dtype, scale, bias, dropout, layout):
    check_against_truth(backend, tokens, n_in, n_out, rank, dtype, scale, bias=bias, dropout=dropout,
                        layout=layout)


@pytest.mark.parametrize("backend", backend_params(("cpu", "cuda")))
@pytest.mark.parametrize("n_in,n_out,dtype", [(i, o, torch.float32) for i, o in REAL_SIZES] + [
    (i, o, torch.bfloat16) for i, o in REAL_SIZES if i * o <= 4096 * 1024])  # bf16 on CPU is slow: smaller ones
def test_real_model_sizes(backend, n_in, n_out, dtype):
    check_against_truth(backend, 5, n_in, n_out, 16, dtype, 2.0, bias=True)


@pytest.mark.parametrize("backend", backend_params(("cpu",)))
@pytest.mark.parametrize("tokens,rank", [(15, 8), (16, 8), (127, 8), (128, 8), (255, 16), (256, 16), (300, 64), (300, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_b_both_orientations(backend, tokens, rank, dtype):
    """The CPU kernels take dB as dy^T xa or (xa^T dy)^T, and x A^T, dy B directly or transposed, by tokens and
    rank (BLAS speed): both sides of each switch point are checked."""
    check_against_truth(backend, tokens, 96, 130, rank, dtype, 2.0, bias=True, dropout=True)


@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_scale_zero_is_the_base_linear(kernel):
    x, W, b, A, B, _, _ = make_inputs(9, 37, 23, 8, torch.float32, "cpu")
    y = lora_linear(x, W, b, A, B, 0.0, kernel=kernel)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, W, b), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_dropout_p0_is_no_dropout(kernel):
    x, W, b, A, B, _, _ = make_inputs(9, 37, 23, 8, torch.float32, "cpu")
    torch.testing.assert_close(lora_linear(x, W, b, A, B, 0.7, dropout_p=0.0, training=True, kernel=kernel),
                               lora_linear(x, W, b, A, B, 0.7, kernel=kernel), rtol=0, atol=0)


def test_dropout_only_in_training():
    x, W, b, A, B, _, _ = make_inputs(9, 37, 23, 8, torch.float32, "cpu")
    eval_y = lora_linear(x, W, b, A, B, 0.7, dropout_p=0.5, training=False)
    torch.testing.assert_close(eval_y, lora_linear(x, W, b, A, B, 0.7))
    train_y = lora_linear(x, W, b, A, B, 0.7, dropout_p=0.5, training=True)
    assert not torch.allclose(train_y, eval_y), "dropout had no effect in training"


def _public_with_grads(kernel, seed, *inputs, scale=0.5, p=0.3, leading=(2, 3)):
    x, W, b, A, B = inputs
    x = x.reshape(*leading, -1).detach().requires_grad_()
    A, B = A.detach().requires_grad_(), B.detach().requires_grad_()
    y = lora_linear(x, W, b, A, B, scale, dropout_p=p, training=True, kernel=kernel,
                    generator=torch.Generator().manual_seed(seed))
    y.backward(torch.ones_like(y) + y.detach())
    return y.detach(), x.grad, A.grad, B.grad


def test_dropout_fused_equals_reference_with_one_generator():
    """The mask is an explicit input drawn from the generator: both kernels see the same one, in
    the forward and (saved) in the backward."""
    inputs = make_inputs(6, 29, 31, 4, torch.float32, "cpu")[:5]
    fused = _public_with_grads("fused", 1234, *inputs)
    ref = _public_with_grads("reference", 1234, *inputs)
    for name, f, r in zip(("y", "dx", "dA", "dB"), fused, ref):
        torch.testing.assert_close(f, r, msg=name)
    other = _public_with_grads("fused", 4321, *inputs)
    assert not torch.allclose(other[0], fused[0]), "another seed must draw another mask"


def test_dropout_mask_statistics_match_torch_dropout():
    """Same law as F.dropout: P(0) = p, kept values 1/(1-p); 200k draws, 5 sigma bounds."""
    p, n = 0.3, 200_000
    mask = L.dropout_mask(torch.ones(n), p, torch.Generator().manual_seed(0))
    zeros = (mask == 0).double().mean().item()
    assert abs(zeros - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert torch.allclose(mask[mask != 0], torch.tensor(1 / (1 - p)))
    torch_zeros = (torch.nn.functional.dropout(torch.ones(n), p) == 0).double().mean().item()
    assert abs(zeros - torch_zeros) < 10 * (p * (1 - p) / n) ** 0.5


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_float64(dropout, bias):
    x, W, b, A, B, _, _ = make_inputs(6, 5, 4, 3, torch.float64, "cpu", bias=bias)
    x = x.reshape(2, 3, 5).requires_grad_()
    A.requires_grad_(), B.requires_grad_()

    def f(x, A, B):  # a fresh generator per call: the same mask at every evaluation
        return lora_linear(x, W, b, A, B, 0.7, dropout_p=0.4 if dropout else 0.0, training=True,
                           generator=torch.Generator().manual_seed(7))

    assert torch.autograd.gradcheck(f, (x, A, B))


def test_grads_only_for_what_requires_them():
    x, W, b, A, B, _, _ = make_inputs(4, 8, 6, 2, torch.float32, "cpu")
    A.requires_grad_()
    lora_linear(x, W, b, A, B, 1.0).sum().backward()
    assert A.grad is not None and x.grad is None and B.grad is None


def test_no_grad_inference_matches_autograd_path():
    x, W, b, A, B, _, _ = make_inputs(4, 8, 6, 2, torch.float32, "cpu")
    with torch.no_grad():
        y0 = lora_linear(x, W, b, A, B, 1.0)
    y1 = lora_linear(x, W, b, A.requires_grad_(), B, 1.0)
    torch.testing.assert_close(y0, y1.detach())


@pytest.mark.parametrize("op", ["lora_linear", "lora_linear_backward"])
@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck(op, dropout):
    x, W, b, A, B, mask, dy = make_inputs(5, 12, 7, 3, torch.float32, "cpu", dropout=dropout)
    if op == "lora_linear":
        args = (x, W, b, A, B, 0.5, mask)
    else:
        xa = torch.ops.lorabench.lora_linear(x, W, b, A, B, 0.5, mask)[1]
        args = (dy, x, W, A, B, xa, 0.5, mask, True)
    torch.library.opcheck(getattr(torch.ops.lorabench, op).default, args)


def test_fused_refuses_a_trainable_base_weight():
    x, W, b, A, B, _, _ = make_inputs(4, 8, 6, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight requires grad.*freeze it"):
        lora_linear(x, W.requires_grad_(), b, A, B, 1.0)
    y = lora_linear(x, W, b, A, B, 1.0, kernel="reference")  # the reference trains it, if asked
    y.sum().backward()
    assert W.grad is not None


@pytest.mark.parametrize("bad,match", [
    (dict(A=torch.zeros(2, 9)), r"lora_A must be \(r, in=8\)"),
    (dict(B=torch.zeros(5, 2)), r"lora_B must be \(out=6, r=2\)"),
    (dict(b=torch.zeros(7)), r"bias must be \(out=6,\)"),
    (dict(x=torch.zeros(4, 9)), r"x must be \(\.\.\., in=8\)"),
    (dict(A=torch.zeros(2, 8, dtype=torch.float64)), r"lora_A.dtype is torch.float64 but x.dtype is torch.float32"),
    (dict(kernel="triton"), r"unknown kernel 'triton'; valid: fused, reference"),
    (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
])
def test_bad_input_gets_a_clear_error(bad, match):
    args = dict(zip("x W b A B".split(), make_inputs(4, 8, 6, 2, torch.float32, "cpu")[:5]))
    args.update({k: v for k, v in bad.items() if k in args})
    kw = {k: v for k, v in bad.items() if k not in args}
    with pytest.raises(ValueError, match=match):
        lora_linear(args["x"], args["W"], args["b"], args["A"], args["B"], 1.0, **kw)


def test_fused_works_without_the_extension():
    """With lorabench._C unimportable the op runs on its registered reference kernel."""
    code = (
        "import sys; sys.modules['lorabench._C'] = None\n"
        "import torch; from lorabench.ops import lora_linear, available_backends, reference\n"
        "assert not available_backends()['cpu'][0], available_backends()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, W, A, B = (torch.randn(*s, generator=g) for s in [(3, 4, 8), (6, 8), (2, 8), (6, 2)])\n"
        "x.requires_grad_(); A.requires_grad_()\n"
        "y = lora_linear(x, W, None, A, B, 0.5)\n"
        "torch.testing.assert_close(y, reference.lora_linear(x, W, None, A, B, 0.5))\n"
        "y.sum().backward(); assert x.grad.shape == x.shape and A.grad is not None\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("dropout", [False, True])
def test_python_autograd_function_gradcheck(dropout):
    """LoraLinearFunction: the autograd used when the extension is not built (the C++ twin is above)."""
    x, W, b, A, B, mask, _ = make_inputs(6, 5, 4, 3, torch.float64, "cpu", dropout=dropout)
    x.requires_grad_(), A.requires_grad_(), B.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, A, B: L.LoraLinearFunction.apply(x, W, b, A, B, 0.7, mask), (x, A, B))
