"""Methods-table row of `star` (issue 8, learning procedure) with a check of STAR's defining
equations (arXiv 2403.01165) on small tensors. The active-learning loop through the harness is
tested in test_star.py."""
import math

import torch

from tests.methods.tester import Case


def star_equations(model, method):
    from lorabench.methods.lora import LoraLinear
    from lorabench.methods.combining.star import (acquire_top, dynamic_uncertainty, dynamic_weight,
                                                  mc_predictive_entropy, minmax, round_starts, scoring,
                                                  split_budget)

    # λ(t) = 1 - t/R decreases over the AL rounds; with R = 10 it is the authors' 1 - 0.1 (iter + 1)
    assert [round(dynamic_weight(t, 10), 6) for t in range(1, 10)] == [round(1 - 0.1 * t, 6) for t in range(1, 10)]
    for bad in (0, 10):
        try:
            dynamic_weight(bad, 10)
        except ValueError:
            pass
        else:
            raise AssertionError(f"round {bad} has no λ (0 is the random initial set)")

    # μ = λ μ_b + (1 - λ) μ_f on min-max normalised uncertainties
    u_b, u_f = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([4.0, 0.0, 2.0])
    mu = dynamic_uncertainty(u_b, u_f, 0.75)
    torch.testing.assert_close(mu, 0.75 * torch.tensor([0.0, 0.5, 1.0]) + 0.25 * torch.tensor([1.0, 0.0, 0.5]))
    torch.testing.assert_close(dynamic_uncertainty(u_b, u_f, 1.0), minmax(u_b))   # all base: round 1 of many
    torch.testing.assert_close(dynamic_uncertainty(u_b, u_f, 0.0), minmax(u_f))
    assert torch.equal(minmax(torch.full((3,), 7.0)), torch.zeros(3))

    # MC-dropout predictive entropy H(mean_s p_s): two confident passes that disagree -> ln 2, not 0
    disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    torch.testing.assert_close(mc_predictive_entropy(disagree), torch.tensor([math.log(2)]))
    agree = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    torch.testing.assert_close(mc_predictive_entropy(agree), torch.tensor([0.0]))
    padded = torch.tensor([[[0.5, 0.5, 0.0]]])        # a 2-option row padded to 3: 0 log 0 = 0
    torch.testing.assert_close(mc_predictive_entropy(padded), torch.tensor([math.log(2)]))

    # the acquisition queries the k most uncertain candidates (ties: the earlier one)
    assert acquire_top(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2) == [1, 3]
    assert acquire_top(torch.tensor([0.1, 0.9, 0.5, 0.9]), 3) == [1, 3, 2]
    assert split_budget(10, 3) == [4, 3, 3] and sum(split_budget(240, 7)) == 240
    assert round_starts(30, 3) == [0, 10, 20] and round_starts(3, 3) == [0, 1, 2]

    # the constraint: AdamW's decoupled decay on B only, B <- B - lr (g + β B); A keeps its value
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    lr, beta = 0.1, method.config.b_weight_decay
    groups = method.param_groups(model, lr, 0.0)
    b_ids = {id(m.lora_B) for m in layers}
    assert [g["weight_decay"] for g in groups if any(id(p) in b_ids for p in g["params"])] == [beta]
    assert all(g["weight_decay"] == 0.0 for g in groups if not any(id(p) in b_ids for p in g["params"]))
    with torch.no_grad():
        for m in layers:
            m.lora_B.copy_(torch.randn_like(m.lora_B))
    b0 = [m.lora_B.detach().clone() for m in layers]
    a0 = [m.lora_A.detach().clone() for m in layers]
    opt = torch.optim.AdamW(groups, lr=lr)
    for g in groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    for m, b, a in zip(layers, b0, a0):
        torch.testing.assert_close(m.lora_B.detach(), b * (1 - lr * beta))
        torch.testing.assert_close(m.lora_A.detach(), a)

    # MC dropout samples on the low-rank path only: LoRA layers train, the backbone evaluates
    model.train()
    with scoring(model, layers, mc=True):
        assert all(m.training for m in layers)
        assert not any(m.training for m in model.modules() if not isinstance(m, LoraLinear)
                       and not any(m is x for layer in layers for x in layer.modules()))
        x = torch.randn(4, layers[0].in_features)
        with torch.no_grad():
            assert not torch.equal(layers[0](x), layers[0](x)), "dropout on A's input draws nothing"
    assert model.training and all(m.training for m in model.modules())   # restored
    with scoring(model, layers, mc=False):
        assert not any(m.training for m in model.modules())


CASES = [
    Case("star", {"rank": 4}, equations=star_equations),
]
