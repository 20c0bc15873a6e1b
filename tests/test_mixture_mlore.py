"""MLoRE (arXiv 2403.17749; lorabench/methods/cross_task/mlore.py) on the text pool: a task-sharing generic path,
routed low-rank experts of different ranks chosen by each task's own router (noisy top-k), a task-specific expert per
task, all linear, so that one example's mixture is one merged linear (the paper's re-parameterisation); the CV²
balancing loss; a protocol (b) trial on tiny-llama records the routing per task."""
from __future__ import annotations

import pytest
import torch

from lorabench.errors import UserError
from lorabench.methods import get_method
from lorabench.methods.cross_task.mixture import Routing
from lorabench.methods.cross_task.mlore import MLoREConfig, MLoRELinear
from tests.methods.tester import batch_for, tiny_model


def layer(seed: int = 0, k: int = 12, d: int = 10, **options) -> MLoRELinear:
    torch.manual_seed(seed)
    c = MLoREConfig(**{"expert_ranks": [1, 2, 3], "top_k": 2, "generic_rank": 2, "specific_rank": 2, "tasks": 3,
                       **options})
    m = MLoRELinear(torch.nn.Linear(k, d), c, Routing())
    with torch.no_grad():   # every B away from its zero init, so every path contributes
        for p in (m.expert_B, m.specific_B, getattr(m, "generic_B", None)):
            if p is not None:
                p.normal_(0, 0.5)
    return m


def with_tasks(m: MLoRELinear, ids: list[int], trained: int = 3) -> MLoRELinear:
    m.routing.task_ids = torch.tensor(ids)
    m.routing.mask = None
    m.routing.trained_tasks = trained
    return m


def test_one_examples_mixture_is_its_merged_single_linear():
    """Every path is linear: at an example's routing (g, m, t) the three paths are W_merged x (MLoRE_repara.py's
    per-sample virtual convolution, on a linear), to rounding; also while training (noisy gates)."""
    m = with_tasks(layer(), [0, 2, 1, -1]).eval()
    x = torch.randn(4, 6, 12)
    out = m(x)
    g, _, mix, ids = m.route(x, torch.ones(4, 6))
    for b in range(4):
        merged = torch.nn.functional.linear(x[b], m.merged_weight(g[b], mix[b], int(ids[b])), m.base.bias)
        torch.testing.assert_close(merged, out[b], atol=1e-5, rtol=1e-5)
    # the recorded quantity: the last training forward's probe, noisy gates included
    m.train()
    m(x)
    diff, rel = m.reparam_error()
    assert diff < 1e-5 and rel < 1e-5
    # the merge is not trivially true: another example's routing does not reproduce this one's output
    other = torch.nn.functional.linear(x[0], m.merged_weight(g[1], mix[1], int(ids[1])), m.base.bias)
    assert not torch.allclose(other, out[0].detach(), atol=1e-3)


def test_experts_have_different_ranks_and_the_parameters_are_exactly_those_ranks():
    m = layer(expert_ranks=[1, 2, 4], generic_rank=3, specific_rank=2, tasks=3)
    k, d = 12, 10
    with torch.no_grad():
        m.expert_B.normal_()
    starts = [0, 1, 3, 7]
    ranks = [torch.linalg.matrix_rank(m.expert_B[:, a:b] @ m.expert_A[a:b]).item() for a, b in zip(starts, starts[1:])]
    assert ranks == [1, 2, 4]
    assert m.expert_of_row.tolist() == [0, 1, 1, 2, 2, 2, 2]
    n = sum(p.numel() for p in m.parameters() if p.requires_grad) - sum(p.numel() for p in m.base.parameters())
    low_rank = (7 + 3 + 3 * 2) * (k + d)              # experts + generic path + 3 task-specific experts
    routers = 3 * (2 * 3 + 1) * k                      # per task: E logits, E noise scales, the specific scale
    assert n == low_rank + routers


def test_each_task_has_its_own_router_and_task_specific_expert_and_a_held_out_task_the_mean_gate():
    m = layer().eval()
    x = torch.randn(1, 5, 12).expand(3, 5, 12).contiguous()   # the same example under three task ids
    g, p, mix, _ = with_tasks(m, [0, 1, 2]).route(x, torch.ones(3, 5))
    assert not torch.allclose(p[0], p[1]) and not torch.allclose(p[1], p[2])   # routers R_0, R_1, R_2 differ
    assert ((g > 0).sum(-1) == 2).all()                                       # top-2 of 3 experts
    assert len(set(mix.tolist())) == 3                                         # each task's own scale m_t
    out = m(x)
    assert not torch.allclose(out[0], out[1])
    # held out (-1): the mean of the trained tasks' gates, no task-specific expert
    g_h, _, mix_h, _ = with_tasks(m, [-1, -1, -1], trained=2).route(x, torch.ones(3, 5))
    torch.testing.assert_close(g_h[0], (g[0] + g[1]) / 2)
    assert (mix_h == 0).all()
    # a task id beyond the routers: a clear error
    with pytest.raises(ValueError, match="task id 3 has no MLoRE router.*tasks="):
        with_tasks(m, [3, 0, 0])(x)


def test_top_k_keeps_the_softmax_values_or_renormalises_and_the_noise_acts_only_in_training():
    x = torch.randn(4, 5, 12)
    m = with_tasks(layer(), [0, 1, 2, 0]).eval()
    g, p, _, _ = m.route(x, torch.ones(4, 5))
    torch.testing.assert_close(g, torch.zeros_like(p).scatter(-1, p.topk(2, -1).indices, p.topk(2, -1).values))
    assert (g.sum(-1) < 1).all()                             # PASCAL: the others zeroed, no renormalisation
    g2, _, _, _ = m.route(x, torch.ones(4, 5))
    assert torch.equal(g, g2)                                # no noise at evaluation
    r = with_tasks(layer(renormalize=True), [0, 1, 2, 0]).eval()
    torch.testing.assert_close(r.route(x, torch.ones(4, 5))[0].sum(-1), torch.ones(4))   # NYUD: renormalised
    m.train()
    torch.manual_seed(1)
    p1 = m.route(x, torch.ones(4, 5))[1]
    assert not torch.allclose(p1, p)                         # noisy gating while training
    m_quiet = with_tasks(layer(noisy=False), [0, 1, 2, 0]).train()
    torch.testing.assert_close(m_quiet.route(x, torch.ones(4, 5))[1], p)


def test_the_generic_path_trains_its_own_factors_but_sends_no_gradient_into_its_input():
    def input_grad(stop: bool):
        m = with_tasks(layer(generic_stop_grad=stop), [0, 1])
        with torch.no_grad():
            m.expert_B.zero_()
            m.specific_B.zero_()
        x = torch.randn(2, 4, 12, requires_grad=True)
        m(x).sum().backward()
        return x.grad, m
    grad, m = input_grad(True)
    assert m.generic_B.grad.abs().sum() > 0 and m.generic_A.grad.abs().sum() > 0
    base_only = m.base.weight.sum(0).expand(2, 4, 12)         # d(Σ W0 x)/dx: the generic path adds nothing
    torch.testing.assert_close(grad, base_only)
    grad_through, _ = input_grad(False)
    assert not torch.allclose(grad_through, base_only)


def test_the_balancing_loss_is_the_squared_coefficient_of_variation_of_the_mean_gate():
    m = with_tasks(layer(), [0, 1, 2, 0]).train()
    x = torch.randn(4, 5, 12)
    torch.manual_seed(3)
    m(x)
    torch.manual_seed(3)
    g = m.route(x, torch.ones(4, 5))[0]
    imp = g.mean(0)
    torch.testing.assert_close(m.aux, (imp.std() / imp.mean()) ** 2)   # losses/loss_schemes.py of the released code
    assert m.aux.requires_grad


@pytest.mark.parametrize("options,pattern", [
    ({"expert_ranks": [1, 2], "top_k": 3}, "top_k=3 is more than the 2 experts"),
    ({"expert_ranks": []}, "must list one positive rank per expert"),
    ({"expert_ranks": [0, 2]}, "must list one positive rank per expert"),
])
def test_bad_options_are_rejected_with_what_is_valid(options, pattern):
    with pytest.raises(UserError, match=pattern):
        get_method("mlore").from_options(options)


def test_on_a_tiny_model_the_task_ids_of_a_batch_route_it():
    model, ctx = tiny_model("llama")
    torch.manual_seed(0)
    method = get_method("mlore").from_options({"tasks": 2})
    model = method.apply(model, ctx)
    for m in method.mixture_layers(model):
        torch.nn.init.normal_(m.expert_B, 0, 0.5)
        torch.nn.init.normal_(m.specific_B, 0, 0.5)
    b = batch_for("llama")
    with torch.no_grad():
        out0 = model(**b, task_ids=torch.zeros(4, dtype=torch.long)).logits
        out1 = model(**b, task_ids=torch.ones(4, dtype=torch.long)).logits
    assert not torch.allclose(out0, out1)


def test_a_tiny_protocol_b_trial_of_mlore_records_its_routing_per_task(tmp_path):
    from lorabench.harness.mixture import run_mixture
    from lorabench.runner.suite import load_suite
    from tests.test_mixture import TINY
    path = tmp_path / "tinymix.yaml"
    path.write_text(TINY.replace("  - {name: mixlora, options: {experts: 2, rank: 2}}",
                                 "  - {name: mlore, options: {expert_ranks: [1, 2, 3], tasks: 2}}"))
    spec = next(s for s in load_suite(str(path)).trials() if s.method == "mlore")
    rec = run_mixture(spec, progress=False)
    mm = rec["method_metrics"]
    assert set(mm["expert_load_by_task"]) == {"0", "1"}          # the two training tasks, each its own router
    assert mm["expert_load_by_task"]["0"] != mm["expert_load_by_task"]["1"]
    assert set(mm["specific_scale_by_task"]) == {"0", "1"} and mm["expert_ranks"] == [1, 2, 3]
    assert mm["aux_loss_last"] > 0 and mm["reparam_max_rel_diff"] < 1e-4
    tasks = rec["mixture"]["tasks"]
    assert set(tasks) == {"socialiqa", "quartz", "rt-mc"} and tasks["rt-mc"]["held_out"]
    assert set(tasks["socialiqa"]["router"]["expert_load_by_task"]) == {"0"}
    assert set(tasks["quartz"]["router"]["expert_load_by_task"]) == {"1"}
    assert set(tasks["rt-mc"]["router"]["expert_load_by_task"]) == {"held_out"}
    assert tasks["rt-mc"]["router"]["specific_scale_by_task"] == {"held_out": 0.0}
    for t in tasks.values():
        load = t["router"]["expert_load"]
        assert len(load) == 3 and abs(sum(load) - 1) < 1e-3
