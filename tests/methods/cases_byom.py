"""Methods-table row of BYOM-LoRA (arXiv 2310.01886) with its defining equation on small tensors: the
rank-q truncated SVD of the LoRA update (Eckart-Young). Its run through the harness is in test_byom_lora.py."""
import torch

from tests.methods.tester import Case


def byom_equations(model, method):
    from lorabench.methods.efficiency_freezing_sharing.byom_lora import truncated_factors

    layers = method.lora_layers(model)
    layer = layers[0]
    q = method.config.keep_rank
    with torch.no_grad():
        for m in layers:
            m.lora_B.copy_(torch.randn_like(m.lora_B))
        delta = layer.delta_weight().clone()
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        best = U[:, :q] @ torch.diag(S[:q]) @ Vh[:q]                       # U_q Σ_q V_q^T
        B, A, _ = truncated_factors(delta, q, layer.scale)
        torch.testing.assert_close(layer.scale * B @ A, best, atol=1e-5, rtol=1e-5)
        x = torch.randn(3, layer.in_features)
        full_out = layer(x)
        metrics = method.compress(model)
        assert layer.lora_A.shape == (q, layer.in_features) and layer.lora_B.shape == (layer.out_features, q)
        torch.testing.assert_close(layer.delta_weight(), best, atol=1e-5, rtol=1e-5)
        # Eckart-Young: the error is the energy of the dropped singular values, and no rank-q matrix does better
        err = (delta - best).norm() / delta.norm()
        torch.testing.assert_close(err, S[q:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())
        assert (delta - layer.scale * torch.randn(layer.out_features, q) @ torch.randn(q, layer.in_features)).norm() \
            > (delta - best).norm()
        assert 0 < metrics["energy_kept"] < 1 and metrics["kept_rank"] == q
        assert not torch.allclose(layer(x), full_out)  # rank r had more than q directions: the output changes


CASES = [
    Case("byom-lora", {"rank": 4, "alpha": 8, "keep_rank": 2}, equations=byom_equations),
]
