"""pytest-benchmark entries for per-example adapters in one batch (lorabench/bench/fast_lora.py): fLoRA's element-wise
form, LoRA through the BGMV op, and a loop over the batch's adapters, forward only (serving), at SmolLM2-135M's hidden
size and ranks 1 and 4. They record times (`pytest tests/bench --benchmark-only`); the ratios come from
`lorabench.bench.fast_lora.bench`, which interleaves the three in one run (docs/cross-task.md). What each variant
computes is tested in tests/test_mixture_methods.py."""
from __future__ import annotations

import pytest
import torch

from lorabench.bench.fast_lora import Config, inputs, variants


@pytest.mark.parametrize("variant", ["flora", "bgmv", "loop"])
@pytest.mark.parametrize("rank", [1, 4])
def test_per_example_adapters_forward(benchmark, variant, rank):
    cfg = Config(examples=8, tokens=16, rank=rank, adapters=8)
    fn = variants(inputs(cfg))[variant]
    with torch.no_grad():
        out = benchmark(fn)
    assert out.shape == (cfg.examples, cfg.tokens, cfg.n_out) and torch.isfinite(out).all()
