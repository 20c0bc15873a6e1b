"""Methods-table rows of the quantization methods of issue 16: ApiQ (arXiv 2402.05147) and L4Q
(arXiv 2402.04902), each with a check of its defining equations on small tensors. Their mechanisms
through the harness are tested in test_apiq.py and test_l4q.py."""
import torch

from tests.methods.tester import Case


def apiq_equations(model, method):
    from lorabench.methods.lora import LoraLinear
    from lorabench.methods.efficiency_quantization.apiq import ApiQVariant, UniformQuantLinear, clipped_quantize

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


def l4q_equations(model, method):
    from lorabench.methods.lora import LoraLinear
    from lorabench.methods.efficiency_quantization.l4q import L4QVariant, lsq_quantize

    # LSQ+ on the merged weight: W_q = clamp(round((W' - b) / d), 0, 2^bits - 1) d + b, per group
    torch.manual_seed(0)
    w = torch.randn(2, 64, requires_grad=True)
    step = torch.full((2, 2), 0.3, requires_grad=True)
    offset = torch.full((2, 2), -0.9, requires_grad=True)
    g = 0.25
    Wq = lsq_quantize(w, step, offset, 2, 32, grad_factor=g)
    v = (w.detach().reshape(2, 2, 32) + 0.9) / 0.3
    q = v.round().clamp(0, 3)
    torch.testing.assert_close(Wq, (q * 0.3 - 0.9).reshape(2, 64))
    # the gradients of sec. 3.2 (STE with clipping; LSQ's step gradient; LSQ+'s offset gradient), scaled by g
    G = torch.randn(2, 64)
    (Wq * G).sum().backward()
    Gg = G.reshape(2, 2, 32)
    inside = (v.round() >= 0) & (v.round() <= 3)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(w.grad, (Gg * inside).reshape(2, 64))
    torch.testing.assert_close(step.grad, g * (Gg * torch.where(inside, v.round() - v, q)).sum(-1))
    torch.testing.assert_close(offset.grad, g * (Gg * (~inside)).sum(-1))

    # the layer: W_q of W' = W0 + s B A, min-max start of d and b, y = x W_q^T + bias; merging writes W_q
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    assert isinstance(layer.variant, L4QVariant)
    c = method.config
    W0 = layer.base.weight.detach().clone()
    grp = W0.reshape(W0.shape[0], -1, c.group_size)
    torch.testing.assert_close(layer.quant_offset.detach(), grp.amin(-1))
    torch.testing.assert_close(layer.quant_step.detach(), (grp.amax(-1) - grp.amin(-1)) / (2 ** c.bits - 1))
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn_like(layer.lora_B) * 0.1)
        merged = W0 + layer.scale * layer.lora_B @ layer.lora_A
        d, b = layer.quant_step[..., None], layer.quant_offset[..., None]
        Wq = (((merged.reshape(grp.shape) - b) / d).round().clamp(0, 2 ** c.bits - 1) * d + b).reshape_as(W0)
        x = torch.randn(3, layer.in_features)
        bias = 0.0 if layer.base.bias is None else layer.base.bias
        torch.testing.assert_close(layer(x), x @ Wq.T + bias, atol=1e-5, rtol=1e-5)
        layer.merge()
        torch.testing.assert_close(layer.base.weight, Wq)
        levels = ((layer.base.weight.reshape(grp.shape) - b) / d).round()
        assert all(len(torch.unique(levels[o, j])) <= 2 ** c.bits for o in range(grp.shape[0]) for j in range(grp.shape[1]))
        layer.unmerge()
        torch.testing.assert_close(layer.base.weight, W0)


CASES = [
    Case("apiq", {"rank": 4, "alpha": 8, "group_size": 32, "calib_steps": 30}, identity_at_init=False,
         equations=apiq_equations),
    Case("l4q", {"rank": 4, "alpha": 8, "group_size": 32, "bits": 4}, identity_at_init=False,
         equations=l4q_equations),
    Case("l4q", {"rank": 2, "alpha": 4, "group_size": 32, "bits": 2, "quant_lr_ratio": 2.0,
                 "target_modules": ["query", "v_proj", "down_proj", "output.dense"]},
         id="l4q-2bit", identity_at_init=False),
]
