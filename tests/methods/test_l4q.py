"""L4Q (arXiv 2402.04902) through the harness: the step sizes and offsets are learnt with the LoRA
factors, the record carries them, the merged model is fully quantized (at most 2^bits levels per group)
and computes what the trained model computes, and it differs from LoRA's at the same seed."""
import pytest
import torch

from lorabench.methods import get_method
from tests.methods.tester import batch_for, logits, train_tiny


trained = train_tiny  # the shared tiny-model training run (tests/methods/tester.py)


def test_l4q_learns_step_sizes_and_merges_into_a_fully_quantized_model():
    model, method, result = trained("l4q", {"rank": 4, "group_size": 32, "bits": 3})
    m = result.method_metrics
    assert m["step_size_rel_change"] > 1e-3          # LSQ moved the step sizes off their min-max start
    assert m["offset_change_in_steps"] > 1e-3
    assert 0 < m["quant_rel_err"] < 0.5
    assert 0 <= m["clipped_fraction"] < 0.5
    layers = method.l4q_layers(model)
    assert layers and all(layer.quant_step.requires_grad for layer in layers)
    b = batch_for("llama")
    trained_out = logits(model, b)
    lora_model, _, _ = trained("lora", {"rank": 4})
    assert not torch.allclose(trained_out, logits(lora_model, b), atol=1e-3)
    method.merge(model)
    torch.testing.assert_close(logits(model, b), trained_out, atol=1e-5, rtol=1e-5)
    for layer in layers:  # every deployed weight is one of 2^3 levels d q + b of its group
        w = layer.base.weight.detach().reshape(layer.out_features, -1, 32)
        q = (w - layer.quant_offset.detach()[..., None]) / layer.quant_step.detach()[..., None]
        torch.testing.assert_close(q, q.round(), atol=1e-3, rtol=0)
        assert q.round().min() >= 0 and q.round().max() <= 7


def test_l4q_rejects_dropout():
    with pytest.raises(ValueError, match="dropout must be 0"):
        get_method("l4q").from_options({"dropout": 0.1})
