"""LoRAShear (arXiv 2310.18356) in the harness's training loop: pruning happens through the hooks within the
smoke suite's 3 steps, the pruned structure is exact zeros, survives save/load, and can be removed."""
import copy
import os

import pytest
import torch

from lorabench.harness.train import TrainConfig, train
from lorabench.methods import get_method
from lorabench.methods.base import load_adapter
from tests.methods.tester import RandomTask, batch_for, logits, tiny_model

SMOKE = {"rank": 4, "sparsity": 0.3, "prune_start_ratio": 0.0, "prune_end_ratio": 0.67, "periods": 2}


def trained(kind, options, steps=3):
    model, ctx = tiny_model(kind)
    torch.manual_seed(0)
    method = get_method("lorashear").from_options(options)
    model = method.apply(model, ctx)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup_ratio=0.0, schedule="constant",
                      warmup_steps_for_throughput=0)
    result = train(model, method, RandomTask(kind), None, cfg, seed=0, progress=False)
    return model, method, ctx, result


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_prunes_within_smoke_steps_and_survives_save_load(kind, tmp_path):
    from lorabench.methods.efficiency_pruning.lorashear import backbone_parameters, remove_pruned_channels
    model, method, _, result = trained(kind, SMOKE)
    total = sum(b.size for b in method.blocks)
    k = int(0.3 * total)
    mm = result.method_metrics
    assert mm["groups_pruned"] == k and mm["groups_total"] == total and mm["group_sparsity"] == round(k / total, 4)
    assert mm["params_after"] < mm["params_before"] and mm["param_reduction"] > 0
    zero = 0
    for b in method.blocks:
        assert all(torch.equal(m.channel_mask, b.mask) for m in b.inputs), "one mask per channel group"
        assert set(b.mask.unique().tolist()) <= {0.0, 1.0}, "no group is left half-shrunk after the window"
        rows = b.mask == 0
        zero += int(rows.sum())
        for m in b.inputs:
            assert (m.lora_B[rows] == 0).all()
        x, _ = b.variables(rows.nonzero().flatten())
        assert torch.count_nonzero(x) == 0, "pruned groups are exactly zero"
    assert zero == k
    batch = batch_for(kind)
    expected = logits(model, batch)
    # removing the pruned channels: same function, the parameter count of the record
    small = remove_pruned_channels(copy.deepcopy(model), method)
    torch.testing.assert_close(logits(small, batch), expected, atol=1e-5, rtol=1e-5)
    assert backbone_parameters(small) == mm["params_after"]
    # the masks travel with the adapter
    path = os.path.join(tmp_path, "a.safetensors")
    method.save_adapter(model, path)
    fresh, ctx = tiny_model(kind)
    loaded, m2 = load_adapter(fresh, path, ctx)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=1e-5)
    assert sum(int((b.mask == 0).sum()) for b in m2.blocks) == k


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_attention_heads_are_pruned_and_removable(kind):
    """Heads as groups (Llama: a key/value head with its query heads): zero after the window, at least one head
    per layer is kept, and removing them (fewer heads, the attention reshapes with -1) keeps the function."""
    from lorabench.methods.efficiency_pruning.lorashear import backbone_parameters, remove_pruned_channels
    model, method, _, result = trained(kind, dict(SMOKE, head_sparsity=0.5))
    mm = result.method_metrics
    heads = sum(g.size for g in method.heads)
    assert heads == 4 and mm["heads_total"] == 4 and mm["heads_pruned"] == 2
    assert all(int((g.mask != 0).sum()) >= 1 for g in method.heads)
    for g in method.heads:
        idx = (g.mask == 0).nonzero().flatten()
        x, _ = g.variables(idx)
        assert torch.count_nonzero(x) == 0
        d = g.inputs[0].in_features // (4 if kind == "llama" else 2)   # head_dim (hidden 32)
        rep = 2 if kind == "llama" else 1                               # query heads per key/value head
        assert g.rows[0].shape[1] == rep * d and g.rows[1].shape[1] == d
    batch = batch_for(kind)
    expected = logits(model, batch)
    small = remove_pruned_channels(copy.deepcopy(model), method)
    torch.testing.assert_close(logits(small, batch), expected, atol=1e-5, rtol=1e-5)
    assert backbone_parameters(small) == mm["params_after"]
    q = "attention.self.query" if kind == "bert" else "self_attn.q_proj"
    layer0 = "bert.encoder.layer.0" if kind == "bert" else "model.layers.0"
    assert small.get_submodule(f"{layer0}.{q}").out_features == 16


def test_recovery_steps_keep_pruned_groups_zero():
    model, method, _, result = trained("llama", {"rank": 4, "sparsity": 0.25, "prune_start_ratio": 0.25,
                                                 "prune_end_ratio": 0.5, "periods": 1}, steps=8)
    # warm-up steps 0-1, pruning 2-3, recovery 4-7: B trains on, the pruned rows stay zero
    assert result.method_metrics["groups_pruned"] == int(0.25 * sum(b.size for b in method.blocks))
    for b in method.blocks:
        for m in b.inputs:
            assert (m.lora_B[b.mask == 0] == 0).all()
            assert (m.lora_B[b.mask == 1] != 0).any()


def test_options_are_validated():
    cls = get_method("lorashear")
    with pytest.raises(ValueError, match="prune_start_ratio"):
        cls.from_options({"prune_start_ratio": 0.5, "prune_end_ratio": 0.4})
    with pytest.raises(ValueError, match="reference"):
        cls.from_options({"kernel": "fused"})
    with pytest.raises(Exception, match="sparsity"):
        cls.from_options({"sparsity": 1.5})
    model, ctx = tiny_model("llama")
    with pytest.raises(ValueError, match="up_proj"):
        cls.from_options({"target_modules": ["gate_proj", "down_proj"]}).apply(model, ctx)
