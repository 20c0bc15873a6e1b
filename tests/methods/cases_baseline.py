"""Methods-table rows of the baselines and of LoRA (arXiv 2106.09685)."""
import torch

from tests.methods.tester import Case


def lora_equations(model, method):
    """Eq. (3) of LoRA: h = W0 x + (alpha/r) B A x, and B = 0 at init."""
    from lorabench.methods.lora import LoraLinear
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    assert torch.count_nonzero(layer.lora_B) == 0
    with torch.no_grad():
        layer.lora_B.normal_()
        x = torch.randn(3, layer.in_features)
        expected = x @ layer.base.weight.T + layer.base.bias + (method.config.alpha / method.config.rank) * (
            x @ layer.lora_A.T @ layer.lora_B.T)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


CASES = [
    Case("full", identity_at_init=True, lr=1e-3),
    Case("head", models=("bert",)),
    Case("lora", {"rank": 4, "alpha": 8}, equations=lora_equations),
    Case("lora", {"rank": 2, "alpha": 4, "target_modules": ["query", "value", "q_proj", "v_proj"],
                  "init": "gaussian", "dropout": 0.1}, id="lora-qv-gaussian-dropout"),
]
