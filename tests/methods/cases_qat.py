"""Methods-table rows of the quantization methods of issue 16: ApiQ (arXiv 2402.05147) and L4Q
(arXiv 2402.04902), each with a check of its defining equations on small tensors. Their mechanisms
through the harness are tested in test_apiq.py and test_l4q.py."""
import torch

from tests.methods.tester import Case


def apiq_equations(model, method):
    from lorabench.methods.lora import LoraLinear
    from lorabench.methods.quantized.apiq import ApiQVariant, UniformQuantLinear, clipped_quantize

    # the quantizer of sec. 3.2: range [sigmoid(beta) min, sigmoid(gamma) max], s = range / (2^b - 1),
    # z = round(-lo / s), Q = (clamp(round(W / s) + z, 0, 2^b - 1) - z) s, per group of inputs
    torch.manual_seed(0)
    w = torch.randn(3, 64)
    gamma, beta = torch.full((3, 2), 1.0), torch.full((3, 2), 0.5)
    Q, codes, scales, zeros = clipped_quantize(w, 2, 32, gamma, beta)
    g = w.reshape(3, 2, 32)
    hi, lo = torch.sigmoid(torch.tensor(1.0)) * g.amax(-1), torch.sigmoid(torch.tensor(0.5)) * g.amin(-1)
    s = (hi - lo) / 3
    z = (-lo / s).round()
    q = ((g / s[..., None]).round() + z[..., None]).clamp(0, 3)
    torch.testing.assert_close(scales, s)
    torch.testing.assert_close(zeros, z)
    torch.testing.assert_close(codes.float(), q.reshape(3, 64))
    torch.testing.assert_close(Q, ((q - z[..., None]) * s[..., None]).reshape(3, 64))
    assert codes.max() <= 3 and len(codes.unique()) <= 4  # 2 bits: four levels per group
    # clipping is learnable through the straight-through rounding: the objective has a gradient in gamma, beta
    gamma.requires_grad_(True)
    beta.requires_grad_(True)
    x = torch.randn(16, 64)
    (x @ clipped_quantize(w, 2, 32, gamma, beta)[0].T - x @ w.T).pow(2).sum().backward()
    assert gamma.grad.abs().sum() > 0 and beta.grad.abs().sum() > 0

    # the layer: y = X^q Q^T + b + s X^q A^T B^T with Q the stored codes' dequantization (QLoRA's forward)
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    assert isinstance(layer.base, UniformQuantLinear) and isinstance(layer.variant, ApiQVariant)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn_like(layer.lora_B) * 0.1)
        x = torch.randn(5, layer.in_features)
        bias = 0.0 if layer.base.bias is None else layer.base.bias
        expected = x @ layer.base.dequantize().T + bias + layer.scale * x @ layer.lora_A.T @ layer.lora_B.T
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)

    # ApiQ-lw: the joint initialisation lowers || X W - X^q (Q + s B A) ||^2 on the calibration inputs
    W = layer.variant.fp_weight.float()
    with torch.no_grad():
        layer.lora_B.zero_()
    X = torch.randn(64, layer.in_features)
    X_q = X + 0.05 * torch.randn_like(X)  # the input of the partly quantized model differs from X
    err0, err1 = method._init_layer(layer, X, X_q)
    assert err1 < 0.85 * err0, (err0, err1)  # 30 Adam steps in this case; 100 (the default) go further
    with torch.no_grad():
        out = X_q @ layer.base.dequantize().T + layer.scale * X_q @ layer.lora_A.T @ layer.lora_B.T
        rel = ((out - X @ W.T).pow(2).sum() / (X @ W.T).pow(2).sum()).item()
    assert abs(rel - err1) < 1e-4 * max(1.0, err1)


CASES = [
    Case("apiq", {"rank": 4, "alpha": 8, "group_size": 32, "calib_steps": 30}, identity_at_init=False,
         equations=apiq_equations),
]
