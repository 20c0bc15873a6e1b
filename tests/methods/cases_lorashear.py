"""Methods-table row of LoRAShear (arXiv 2310.18356) with a check of LHSPG's defining equations."""
import copy

import torch

from lorabench.methods.base import TrainState
from tests.methods.tester import Case, batch_for, logits


def lhspg_tensor_equations():
    """Half-space projection, forget schedule and saliency on small tensors."""
    from lorabench.methods.efficiency_pruning.lorashear import (forget_rate, halfspace_zero, lhspg_step, period_sizes,
                                                       saliency_scores)
    # the forget rate lambda_t = 1/(T - t) shrinks to (T - t - 1)/T after t + 1 steps and to exactly 0 at t = T - 1
    T = 4
    left = 1.0
    for t in range(T):
        left *= 1 - forget_rate(t, T)
        assert abs(left - (T - t - 1) / T) < 1e-12
    assert left == 0.0
    assert period_sizes(7, 3) == [2, 2, 3] and period_sizes(2, 1) == [2] and sum(period_sizes(0, 4)) == 0
    # trial iterate x~ = (1 - 1/4) x_half; a group whose trial crosses the half-space {z: z.x >= 0} goes to 0
    x_prev = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x_half = torch.tensor([[-1.0, 0.1], [0.0, 0.9], [1.0, 1.0]])
    new, zeroed = lhspg_step(x_prev, x_half, 0, T, 0.0)
    assert zeroed.tolist() == [True, False, False]
    torch.testing.assert_close(new, torch.tensor([[0.0, 0.0], [0.0, 0.675], [0.75, 0.75]]))
    # eps moves the half-space boundary: x~.x < eps ||x||^2 (0.675 < 0.8 and 1.5 < 1.6)
    assert halfspace_zero(0.75 * x_half, x_prev, 0.8).tolist() == [True, True, True]
    assert halfspace_zero(0.75 * x_half, x_prev, 0.7).tolist() == [True, True, False]
    # the boundary itself is inside the half-space (strict <): a trial orthogonal to x is kept at eps = 0
    assert halfspace_zero(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), 0.0).tolist() == [False]
    # the period's last step ends with every redundant group exactly zero
    new, _ = lhspg_step(x_prev, x_half, T - 1, T, 0.0)
    assert torch.count_nonzero(new) == 0
    # saliency: each proxy normalised over the groups, then averaged with equal weights
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    d = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])
    nx = torch.tensor([5.0, 1.0, 2.0])
    inner = torch.tensor([3.0, -1.0, 0.0])
    cos = torch.tensor([3 / 5, -1.0, 0.0]) + 1
    parts = [nx, nx / 2, cos, inner.abs(), 0.5 * inner ** 2]
    want = sum(0.2 * p / p.norm() for p in parts)
    torch.testing.assert_close(saliency_scores(x, d), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(saliency_scores(x, d, "magnitude"), nx / nx.norm())
    torch.testing.assert_close(saliency_scores(x, d, "taylor"), inner.abs() / inner.norm())


def lorashear_equations(model, method):
    """LHSPG through the hooks: the least-salient groups become redundant, shrink by (1 - lambda_t) per step,
    are exactly zero at the period's end (or earlier by the half-space projection); removing them physically
    leaves the function unchanged; the masks and metrics say what was pruned."""
    from lorabench.methods.efficiency_pruning.lorashear import backbone_parameters, remove_pruned_channels
    lhspg_tensor_equations()
    c = method.config
    c.sparsity, c.prune_start_ratio, c.prune_end_ratio, c.periods, c.saliency = 0.25, 0.0, 0.5, 1, "magnitude"
    blocks = method.blocks
    # crafted magnitudes: channel j of block i has ||row|| = 1 + j + 1000 i, so the lowest quarter is block 0's first
    with torch.no_grad():
        for i, b in enumerate(blocks):
            for m in b.inputs:
                w = torch.randn_like(m.base.weight)
                m.base.weight.copy_(w / w.norm(dim=1, keepdim=True) * (1.0 + torch.arange(b.size)[:, None]
                                                                         + 1000.0 * i) / len(b.inputs) ** 0.5)
                if m.base.bias is not None:
                    m.base.bias.zero_()
    total = sum(b.size for b in blocks)
    k = int(0.25 * total)
    opt = torch.optim.SGD([p for _, p in method.trainable_parameters(model)], lr=0.0)
    st = TrainState(model, opt, None, 0, 4)   # window [0, 2): one period of T = 2 steps, then 2 recovery steps
    method.on_train_begin(st)
    assert (method.period_steps, method.n_periods, method.target) == (2, 1, k)
    method.on_step_begin(st)
    red = torch.cat([method.redundant[id(b)] for b in blocks])
    assert int(red.sum()) == k and red[:k].all(), "the least-salient groups become redundant (Algorithm 2)"
    ref = {id(m): m.base.weight.detach().clone() for b in blocks for m in b.inputs}
    method.on_step_end(st)
    assert torch.allclose(blocks[0].mask[:k], torch.full((k,), 0.5)), "x~ = (1 - 1/(T - 0)) x at t = 0"
    assert (blocks[0].mask[k:] == 1).all() and all((b.mask == 1).all() for b in blocks[1:])
    assert all(torch.equal(m.base.weight, ref[id(m)]) for b in blocks for m in b.inputs), "frozen weights untouched"
    st.step = 1
    method.on_step_begin(st)
    method.on_step_end(st)
    assert (blocks[0].mask[:k] == 0).all(), "the redundant groups are exactly zero at the period's end"
    assert sum(int(method.pruned[id(b)].sum()) for b in blocks) == k
    assert not any(method.redundant[id(b)].any() for b in blocks)
    x, _ = blocks[0].variables(torch.arange(k))
    assert torch.count_nonzero(x) == 0
    # recovery steps leave the pruned groups at zero, even when the optimizer moved their B rows
    with torch.no_grad():
        for m in blocks[0].inputs:
            m.lora_B.add_(0.1)
    st.step = 2
    method.on_step_begin(st)
    method.on_step_end(st)
    assert all((m.lora_B[:k] == 0).all() for m in blocks[0].inputs)
    method.on_train_end(st)
    mm = st.metrics
    assert mm["groups_pruned"] == k and mm["groups_total"] == total and mm["target_sparsity"] == 0.25
    # pruned groups removed: the same function with fewer parameters, as many as the record says
    b = batch_for("bert" if hasattr(model, "bert") else "llama")
    before = logits(model, b)
    small = remove_pruned_channels(copy.deepcopy(model), method)
    torch.testing.assert_close(logits(small, b), before, atol=1e-5, rtol=1e-5)
    assert backbone_parameters(small) == mm["params_after"] < mm["params_before"] == backbone_parameters(model)
    suffix = "intermediate.dense" if hasattr(model, "bert") else "gate_proj"
    assert small.get_submodule(f"{blocks[0].name}.{suffix}").out_features == blocks[0].size - k

    # the half-space projection fires before the period's end when x~ . x < eps ||x||^2: with eps = 0.6 and an
    # unchanged LoRA (x_{t+1/2} = x_t), x~ = 0.5 x_t at t = 0 of a 2-step period, and 0.5 < 0.6
    for blk in blocks:
        blk.set_mask(torch.ones(blk.size))
    c.epsilon = 0.6
    st = TrainState(model, opt, None, 0, 4)
    method.on_train_begin(st)
    method.on_step_begin(st)
    method.on_step_end(st)
    assert (blocks[0].mask[:k] == 0).all() and method.early_projections == k


CASES = [
    Case("lorashear", {"rank": 4, "sparsity": 0.25, "prune_start_ratio": 0.0, "prune_end_ratio": 0.67, "periods": 2},
         equations=lorashear_equations),
    Case("lorashear", {"rank": 4, "sparsity": 0.25, "head_sparsity": 0.5, "prune_start_ratio": 0.0,
                       "prune_end_ratio": 0.67, "periods": 2}, id="lorashear-heads"),
]
