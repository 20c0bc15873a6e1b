"""pytest-benchmark entries for the fused LoRA / DoRA linear (lorabench/ops/lora.py) against the eager
unfused formula `base(x) + B(A(dropout(x))) * s` and the base linear alone, forward + backward.

These record times (`pytest tests/bench --benchmark-only`, compare with `--benchmark-compare`); they
assert only that each variant runs. The overhead ratios of the issue's targets come from
`python -m lorabench bench kernels`, which interleaves the variants in one run (docs/kernels.md).
"""
from __future__ import annotations

import pytest
import torch

from lorabench.ops import dora_linear, lora_linear

SHAPES = [(1, 576, 576), (512, 576, 1536)]  # (tokens, in, out): SmolLM2-135M attention and MLP layers
RANK, SCALE = 16, 2.0


def _layer(tokens, n_in, n_out):
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(n_in, n_out).requires_grad_(False)
    a, b = torch.nn.Linear(n_in, RANK, bias=False), torch.nn.Linear(RANK, n_out, bias=False)
    with torch.no_grad():
        b.weight.copy_(torch.randn(n_out, RANK, generator=g) / RANK)
    x = torch.randn(tokens, n_in, generator=g, requires_grad=True)
    m = torch.linalg.norm(base.weight, dim=1).requires_grad_(True)
    return base, a, b, x, m


def _variant(name, base, a, b, m):
    W, bias, A, B = base.weight, base.bias, a.weight, b.weight
    return {
        "base": (lambda x: base(x), ()),
        "eager": (lambda x: base(x) + b(a(x)) * SCALE, (A, B)),
        "fused": (lambda x: lora_linear(x, W, bias, A, B, SCALE), (A, B)),
        "dora_fused": (lambda x: dora_linear(x, W, bias, A, B, m, SCALE), (A, B, m)),
    }[name]


@pytest.mark.parametrize("variant", ["base", "eager", "fused", "dora_fused"])
@pytest.mark.parametrize("tokens,n_in,n_out", SHAPES, ids=[f"{t}x{i}x{o}" for t, i, o in SHAPES])
def test_lora_linear_fwd_bwd(benchmark, variant, tokens, n_in, n_out):
    base, a, b, x, m = _layer(tokens, n_in, n_out)
    fn, params = _variant(variant, base, a, b, m)
    gy = torch.ones(tokens, n_out)

    def step():
        return torch.autograd.grad(fn(x), (x, *params), gy)

    grads = benchmark(step)
    assert grads[0].shape == x.shape and all(torch.isfinite(g).all() for g in grads)
