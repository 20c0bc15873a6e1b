"""Init[B] against Init[A] (arXiv 2406.08447) through the harness: the zero factor A grows from 0,
the record carries the mechanism metrics, and the trained model differs from LoRA's at the same seed."""
import pytest
import torch

from lorabench.errors import UserError
from lorabench.methods import get_method
from tests.methods.tester import batch_for, logits, train_tiny


trained = train_tiny  # the shared tiny-model training run (tests/methods/tester.py)


def test_init_b_learns_from_a_zero_a_and_differs_from_lora():
    model_b, method_b, res_b = trained("lora-init-b", {"rank": 4})
    model_a, _, res_a = trained("lora", {"rank": 4})
    m = res_b.method_metrics
    assert m["zero_factor_norm"] > 0                  # A started at exactly 0 and was learnt
    assert 0 < m["random_factor_rel_change"] < 1      # B moved from its random start
    assert m["delta_w_norm"] > 0
    assert all(torch.count_nonzero(layer.lora_A) > 0 for layer in method_b.lora_layers(model_b))
    b = batch_for("llama")
    assert not torch.allclose(logits(model_b, b), logits(model_a, b), atol=1e-4)
    assert res_b.final_loss != res_a.final_loss


def test_init_b_refuses_init_a():
    with pytest.raises(UserError, match="expected one of 'A'"):
        get_method("lora-init-b").from_options({"zero_init": "B"})
