"""ApiQ (arXiv 2402.05147) through the harness: the activation-preserving initialisation runs on the
first training batches, lowers the layers' output error and the model's logit error against the
full-precision model, is saved with the adapter, and the trained model differs from LoRA's."""
import pytest
import torch

from lorabench.methods import get_method
from lorabench.methods.base import load_adapter
from tests.methods.tester import batch_for, logits, tiny_model, train_tiny


trained = train_tiny  # the shared tiny-model training run (tests/methods/tester.py)


def test_apiq_preserves_activations_and_differs_from_lora(tmp_path):
    model, method, result = trained("apiq", {"rank": 4, "group_size": 32, "bits": 2, "calib_batches": 2})
    m = result.method_metrics
    assert m["layers_initialised"] == len(method.apiq_layers(model)) == 14
    assert m["calib_stages"] == 8                        # q/k/v and gate/up are calibrated together
    assert m["act_rel_err_after"] < 0.7 * m["act_rel_err_before"]
    assert m["logit_rel_err_after"] < 0.5 * m["logit_rel_err_before"]
    assert all(layer.variant.fp_weight is None for _, layer in method.apiq_layers(model))  # only Q, A, B kept
    lora_model, _, lora_result = trained("lora", {"rank": 4})
    b = batch_for("llama")
    assert not torch.allclose(logits(model, b), logits(lora_model, b), atol=1e-3)
    # the calibrated quantization travels with the adapter: a fresh apply quantizes differently
    path = str(tmp_path / "apiq.safetensors")
    method.save_adapter(model, path)
    fresh, ctx = tiny_model("llama")
    loaded, _ = load_adapter(fresh, path, ctx)
    torch.testing.assert_close(logits(loaded, b), logits(model, b), atol=1e-5, rtol=1e-5)
    plain, ctx = tiny_model("llama")
    plain = get_method("apiq").from_options({"rank": 4, "group_size": 32}).apply(plain, ctx)
    assert not torch.allclose(logits(plain, b), logits(model, b), atol=1e-3)


def test_apiq_group_size_must_divide_the_layers():
    model, ctx = tiny_model("llama")  # hidden 32: group 64 does not divide it
    with pytest.raises(ValueError, match="group_size must be one of .* and divide in_features"):
        get_method("apiq").from_options({"group_size": 64}).apply(model, ctx)
