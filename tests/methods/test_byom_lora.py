"""BYOM-LoRA (arXiv 2310.01886) through the harness: LoRA at rank r is trained, then compressed to
rank q by truncated SVD at the end of training; the compressed adapter is what is evaluated and saved
(smaller than LoRA's, loads back exactly), and it differs from LoRA's model at the same seed, which
it equals before the compression."""
import os

import pytest
import torch

from lorabench.methods import get_method
from lorabench.methods.base import load_adapter
from tests.methods.tester import batch_for, logits, tiny_model, train_tiny


trained = train_tiny  # the shared tiny-model training run (tests/methods/tester.py)


def test_byom_compresses_the_trained_lora_to_rank_q(tmp_path):
    model, method, result = trained("byom-lora", {"rank": 8, "keep_rank": 2})
    lora_model, lora, lora_result = trained("lora", {"rank": 8})
    m = result.method_metrics
    assert result.final_loss == lora_result.final_loss       # the fine-tuning stage is LoRA's, step for step
    assert m["kept_rank"] == 2 and 0 < m["energy_kept"] < 1 and 0 < m["delta_rel_err"] < 1
    assert m["loss_rank_q"] != m["loss_rank_r"]
    assert all(layer.rank == 2 and layer.lora_A.shape[0] == 2 for layer in method.lora_layers(model))
    b = batch_for("llama")
    out = logits(model, b)
    assert not torch.allclose(out, logits(lora_model, b), atol=1e-5)
    path, lora_path = str(tmp_path / "byom.safetensors"), str(tmp_path / "lora.safetensors")
    size = method.save_adapter(model, path)
    assert size < 0.5 * lora.save_adapter(lora_model, lora_path)  # q = r / 4 numbers per layer, plus the header
    fresh, ctx = tiny_model("llama")
    loaded, _ = load_adapter(fresh, path, ctx)
    torch.testing.assert_close(logits(loaded, b), out, atol=1e-5, rtol=1e-5)
    assert os.path.getsize(path) == size


def test_byom_keep_rank_must_be_below_rank():
    with pytest.raises(ValueError, match="keep_rank .* must be below rank"):
        get_method("byom-lora").from_options({"rank": 4, "keep_rank": 4})
