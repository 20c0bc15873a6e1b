"""Every method of the methods table trains under the full board's precision (suites/standard.yaml: train.autocast
bf16-fp32-attention): a few steps of the real loop on the tiny BERT and Llama under bf16 autocast with attention in
fp32 run without error, every loss is finite and every trainable tensor moves. A method whose kernels or hooks refuse
bf16 inputs is named here before a board part meets it."""
from __future__ import annotations

import math

import pytest
import torch

from lorabench.harness.train import TrainConfig, train
from lorabench.methods import get_method
from tests.methods import tester
from tests.methods.test_methods_table import CASES

# Until 8 Dec 2026 seven cases failed here ("expected scalar type Float but found BFloat16"): the fused DoRA, NF4 and
# int4 kernels took x and the factors in one dtype, and MLoRE's re-parameterisation probe kept a bf16 activation.
# The fused ops now follow autocast's linear policy (lorabench/ops/_backend.py, autocast_dtype;
# tests/kernels/test_autocast.py).
RUNS = [pytest.param(c, kind, id=f"{c.name}-{kind}") for c in CASES for kind in c.models]


@pytest.mark.parametrize("case,kind", RUNS)
def test_every_method_trains_under_bf16_autocast_with_fp32_attention(case, kind):
    model, ctx = tester.tiny_model(kind)
    torch.manual_seed(0)
    method = get_method(case.method).from_options(case.options)
    model = method.apply(model, ctx)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(steps=3, batch_size=4, lr=case.lr, warmup_ratio=0.0, schedule="constant",
                      warmup_steps_for_throughput=0, loss_curve_every=1, autocast="bf16-fp32-attention")
    result = train(model, method, tester.RandomTask(kind), None, cfg, seed=0, progress=False)
    assert result.loss_curve and all(math.isfinite(x) for x in result.loss_curve), (case.name, result.loss_curve)
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == before[n].dtype for n, p in after.items())        # fp32 weights stay fp32
    assert any(not torch.equal(p, before[n]) for n, p in after.items() if n in before), f"{case.name}: nothing trained"
