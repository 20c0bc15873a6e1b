"""Mixtures of LoRA experts and the cross-task protocol (b) (issue 17): the shared layer's equations, each
router's mechanism, the suite, and a tiny protocol (b) run on the smoke suite's random tiny-llama.

Everything here is small tensors or the 2-layer random Llama (seconds).
"""
from __future__ import annotations

import math

import pytest
import torch

from lorabench.errors import UserError
from lorabench.methods import METHODS, get_method
from lorabench.methods.cross_task.mixture import MixtureConfig, MixtureLinear, MixtureMethod, Routing
from tests.methods.tester import batch_for, tiny_model

MIXTURES = [n for n in METHODS.names() if METHODS.meta(n)["family"] == "cross-task"
            and issubclass(get_method(n), MixtureMethod)]


def layer(seed: int = 0, k: int = 12, d: int = 10, experts: int = 4, **options) -> MixtureLinear:
    torch.manual_seed(seed)
    c = MixtureConfig(experts=experts, **options)
    m = MixtureLinear(torch.nn.Linear(k, d), c, experts, Routing())
    with torch.no_grad():   # B away from its zero init, so every expert contributes
        m.lora_B.normal_(0, 0.5)
    return m


def reference(m: MixtureLinear, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """W0 x + Σ_e g_e s B_e A_e x, one expert at a time (rank-masked), the equation the batched form computes."""
    out = m.base(x)
    for e in range(m.E):
        out = out + g[..., e:e + 1] * (x @ m.delta_weight(e).T)
    return out


# -- the layer ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{"router": "softmax"}, {"router": "topk", "top_k": 2},
                                     {"router": "topk", "top_k": 1, "renormalize": False},
                                     {"router": "static"}, {"router": "topk", "expert_ranks": [1, 4, 2, 3]},
                                     {"router": "softmax", "level": "sequence"}],
                         ids=["softmax", "top2", "top1", "static", "ranks", "sequence"])
def test_batched_experts_equal_the_per_expert_sum(options):
    m = layer(rank=4, **options).eval()
    x = torch.randn(3, 5, 12)
    g, _, _ = m.gates(x)
    torch.testing.assert_close(m(x), reference(m, x, g), atol=1e-5, rtol=1e-5)
    if "expert_ranks" in options:   # expert 0 has rank 1: rows 1..3 of its A do not act
        assert torch.count_nonzero(m.rank_mask.reshape(4, 4).sum(1) - torch.tensor([1., 4., 2., 3.])) == 0


def test_topk_gate_keeps_k_experts_per_token_renormalised_and_top1_keeps_the_probability():
    m = layer(router="topk", top_k=2).eval()
    x = torch.randn(2, 7, 12)
    g, p, _ = m.gates(x)
    assert ((g > 0).sum(-1) == 2).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(2, 7))
    chosen = p.topk(2, -1).indices
    assert torch.equal((g > 0), torch.zeros_like(g, dtype=torch.bool).scatter(-1, chosen, True))
    m1 = layer(router="topk", top_k=1, renormalize=False).eval()
    g1, p1, _ = m1.gates(x)
    assert ((g1 > 0).sum(-1) == 1).all()
    torch.testing.assert_close(g1.max(-1).values, p1.max(-1).values)   # Switch: the router keeps a gradient


def test_task_gate_depends_on_the_task_only_and_an_unknown_task_gets_the_mean_gate():
    m = layer(router="task", n_tasks=4, task_dim=6).eval()
    m.routing.trained_tasks = 3
    x = torch.randn(4, 5, 12)
    m.routing.task_ids = torch.tensor([0, 0, 2, -1])
    g, _, _ = m.gates(x)
    assert torch.equal(g[0], g[1]) and not torch.allclose(g[0], g[2])    # same task, other tokens: same gate
    assert torch.equal(g[0, 0].expand(5, -1), g[0])                         # the same for every token
    every = torch.softmax(m.router(m.task_embedding(torch.arange(3))), -1)
    torch.testing.assert_close(g[3, 0], every.mean(0))
    g2, _, _ = m.gates(torch.randn(4, 5, 12))   # other inputs, same tasks: the same gates
    torch.testing.assert_close(g, g2)


def test_sequence_routing_gives_one_gate_per_example_from_its_real_tokens():
    m = layer(router="topk", top_k=2, level="sequence").eval()
    x = torch.randn(2, 6, 12)
    m.routing.mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    g, _, _ = m.gates(x)
    assert torch.equal(g[0, 0].expand(6, -1), g[0]) and torch.equal(g[1, 0].expand(6, -1), g[1])
    y = x.clone()
    y[0, 4:] = 100.0   # padding changes nothing
    torch.testing.assert_close(m.gates(y)[0], g)


def test_expert_capacity_bounds_each_experts_tokens_and_dropout_acts_only_in_training():
    m = layer(router="topk", top_k=2, capacity_factor=0.5)
    x = torch.randn(2, 10, 12)
    m.eval()
    g, _, _ = m.gates(x)
    cap = math.ceil(0.5 * 2 * 20 / 4)
    assert ((g > 0).sum((0, 1)) <= cap).all()
    assert (g > 0).sum() < 2 * 20     # some assignments went over capacity and were dropped
    d = layer(router="topk", top_k=2, expert_dropout=0.5)
    d.eval()
    assert ((d.gates(x)[0] > 0).sum(-1) == 2).all()
    d.train()
    torch.manual_seed(1)
    assert ((d.gates(x)[0] > 0).sum(-1) < 2).any()


def test_switch_loss_is_E_sum_f_P_and_training_on_it_lowers_the_load_imbalance():
    m = layer(router="topk", top_k=1, experts=4)
    x = torch.randn(1, 200, 12)
    with torch.no_grad():   # a router that sends most tokens to expert 0
        m.router.weight.zero_()
        m.router.weight[0] = x[0].mean(0) * 5
    mask = torch.ones(1, 200)
    g, p, _ = m.gates(x)
    f = (g > 0).float().sum((0, 1)) / 200
    torch.testing.assert_close(m.switch_loss(g, p, mask), 4 * (f * p.mean((0, 1))).sum())

    def cv() -> float:
        load = (m.gates(x)[0] > 0).float().sum((0, 1))
        return float(load.std(unbiased=False) / load.mean())
    before = cv()
    opt = torch.optim.SGD(m.router.parameters(), lr=0.5)
    for _ in range(60):
        g, p, _ = m.gates(x)
        opt.zero_grad()
        m.switch_loss(g, p, mask).backward()
        opt.step()
    assert cv() < 0.5 * before, (before, cv())


def test_loramoe_localized_balancing_constraint_follows_its_equations():
    m = layer(router="softmax", experts=4, lbc_delta=0.2)
    g = torch.rand(3, 5, 4)
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    types = torch.tensor([0, 1, 1])
    Q = torch.stack([(g[i] * mask[i, :, None]).sum(0) for i in range(3)], 1)        # (E, B), eq. (7)
    I = torch.tensor([[1.2 if (e >= 2) == bool(t) else 0.8 for t in types] for e in range(4)])   # eq. (8)
    Z = I * Q
    torch.testing.assert_close(m.lbc_loss(g, mask, types), Z.var(unbiased=False) / Z.mean())   # eq. (9)


def test_multilora_sums_parallel_modules_with_learnt_scales():
    m = layer(router="static", experts=3, rank=2).eval()
    with torch.no_grad():
        m.expert_scale.copy_(torch.tensor([0.5, 2.0, -1.0]))
    x = torch.randn(2, 4, 12)
    dw = sum(s * m.delta_weight(e) for e, s in enumerate([0.5, 2.0, -1.0]))
    torch.testing.assert_close(m(x), m.base(x) + x @ dw.T, atol=1e-5, rtol=1e-5)


def test_mtlora_adds_the_shared_module_and_the_examples_own_task_module_only():
    m = layer(router="task-specific", experts=4, shared_experts=1, rank=2).eval()
    x = torch.randn(3, 5, 12)
    m.routing.task_ids = torch.tensor([0, 2, -1])
    expected = torch.stack([x[0] @ (m.delta_weight(0) + m.delta_weight(1)).T,
                            x[1] @ (m.delta_weight(0) + m.delta_weight(3)).T,
                            x[2] @ m.delta_weight(0).T])                    # an unseen task: the shared module alone
    torch.testing.assert_close(m(x), m.base(x) + expected, atol=1e-5, rtol=1e-5)
    m.routing.task_ids = torch.tensor([0, 3, 0])
    with pytest.raises(ValueError, match="no task-specific expert"):
        m(x)
    with pytest.raises(ValueError, match="more experts"):
        MixtureConfig(router="task-specific", experts=1, shared_experts=1)


def test_mixture_of_loras_trains_expert_t_on_task_t_first_then_supervises_the_router_by_task():
    from lorabench.methods.base import TrainState
    model, ctx = tiny_model("llama")
    torch.manual_seed(0)
    method = get_method("mixture-of-loras").from_options({"experts": 2, "rank": 2, "teacher_forcing": 0.5})
    model = method.apply(model, ctx)
    b = batch_for("llama")
    ids = torch.tensor([0, 1, 1, 0])
    state = TrainState(model, None, None, step=0, total_steps=10)
    method.on_step_begin(state)                              # first stage: every example through its task's expert
    model.train()
    model(**b, task_ids=ids).loss.backward()
    for m in method.mixture_layers(model):
        g, _, _ = m.gates(torch.randn(4, 3, m.in_features))
        assert torch.equal(g[:, 0, :], torch.nn.functional.one_hot(ids, 2).float())
        assert m.router.weight.grad is None or float(m.router.weight.grad.abs().sum()) == 0   # the LM loss skips it
    aux = method.extra_loss(state)                           # ... while the router learns the task labels
    assert aux is not None and float(aux.detach()) > 0
    state.step = 5
    method.on_step_begin(state)                              # second stage: the router decides, one expert each
    m = method.mixture_layers(model)[0]
    g, p, _ = m.gates(torch.randn(4, 3, m.in_features))
    assert ((g > 0).sum(-1) == 1).all() and torch.equal(g[:, 0], g[:, 1])
    assert state.metrics["teacher_forced_steps"] == 1
    # the supervision is -log p(task) of the example's sequence-level distribution
    m.routing.task_ids = ids
    torch.testing.assert_close(m.task_ce_loss(p), -p[torch.arange(4), 0, ids].log().mean())


def test_mola_puts_more_experts_in_higher_layers():
    model, ctx = tiny_model("llama")
    method = get_method("mola").from_options({"rank": 2, "experts_by_depth": [2, 6]})
    model = method.apply(model, ctx)
    counts = {n: m.E for n, m in model.named_modules() if isinstance(m, MixtureLinear)}
    assert {e for n, e in counts.items() if ".layers.0." in n} == {2}
    assert {e for n, e in counts.items() if ".layers.1." in n} == {6}


def test_task_ids_in_a_batch_route_the_model_and_never_reach_it():
    model, ctx = tiny_model("llama")
    torch.manual_seed(0)
    method = get_method("moelora").from_options({"experts": 3, "rank": 2, "task_dim": 4})
    model = method.apply(model, ctx)
    for m in method.mixture_layers(model):
        torch.nn.init.normal_(m.lora_B, 0, 0.5)
    b = batch_for("llama")
    with torch.no_grad():
        out0 = model(**b, task_ids=torch.zeros(4, dtype=torch.long)).logits
        out1 = model(**b, task_ids=torch.ones(4, dtype=torch.long)).logits
        method.set_task(1)
        out_default = model(**b).logits
    assert not torch.allclose(out0, out1)                 # the task id changes the gate, hence the output
    torch.testing.assert_close(out_default, out1)         # without task_ids: the default task


def test_every_mixture_is_registered_in_the_cross_task_family_with_its_paper():
    assert set(MIXTURES) == {"mixlora", "loramoe", "moelora", "sira", "mola", "multilora", "llava-mole", "octavius",
                             "mtlora", "mixture-of-loras", "x-lora", "mixlora-cfs", "mocle", "fast-lora", "moral",
                             "mlore"}
    for n in MIXTURES:
        cls = get_method(n)
        assert cls.paper and cls.paper in (cls.__doc__ or ""), n
        assert METHODS.meta(n)["paper"] == cls.paper


# -- the suite and a tiny protocol (b) run ---------------------------------------------------------------

TINY = """suite: tinymix
version: 1
description: "protocol (b) on the smoke suite's random tiny-llama"
seeds: [0]
train: {steps: 4, batch_size: 4, eval_batch_size: 16, warmup_steps_for_throughput: 1, lr: 1.0e-2}
mixture: {knowledge_tasks: [quartz]}
splits:
  a: {train: [socialiqa, quartz], held_out: [rt-mc]}
tasks:
  - {name: socialiqa, model: tiny-llama, options: {n_train: 24, n_eval: 8}}
  - {name: quartz, model: tiny-llama, options: {n_train: 24, n_eval: 8}}
  - {name: rt-mc, model: tiny-llama, options: {n_train: 24, n_eval: 8}}
methods:
  - {name: lora, options: {rank: 4, alpha: 8}}
  - {name: moelora, options: {experts: 2, rank: 2, task_dim: 8}}
  - {name: mixlora, options: {experts: 2, rank: 2}}
"""


def test_the_mixture_suite_loads_and_runs_every_mixture_the_lora_reference_and_the_ensemble():
    from lorabench.runner.suite import load_suite, trial_id
    suite = load_suite("mixture")
    assert {m.name for m in suite.methods} == set(MIXTURES) | {"lora", "lora-ensemble"}
    trials = suite.trials()
    assert len(trials) == len(suite.methods) * len(suite.splits) * len(suite.seeds)
    assert len({trial_id(t) for t in trials}) == len(trials)
    assert all(t.label.endswith("@pool-a") and len(t.mixture["held_out"]) == 3 for t in trials)


@pytest.mark.parametrize("old,new,pattern", [
    ("  - {name: lora, options: {rank: 4, alpha: 8}}", "  - lorahub", "neither a mixture of LoRA experts nor lora"),
    ("held_out: [rt-mc]", "held_out: [nope]", "not in this suite's tasks"),
    ("held_out: [rt-mc]", "held_out: [quartz]", "lists a task twice"),
    (", held_out: [rt-mc]}", "}", "exactly the keys train and held_out"),
    ("knowledge_tasks: [quartz]", "knowledge_tasks: [rt-mc]", "not training tasks"),
    ("mixture: {knowledge_tasks: [quartz]}\n", "", "splits needs a `mixture:` mapping"),
])
def test_bad_mixture_suites(tmp_path, old, new, pattern):
    from lorabench.runner.suite import load_suite
    assert old in TINY
    path = tmp_path / "tinymix.yaml"
    path.write_text(TINY.replace(old, new))
    with pytest.raises(UserError, match=pattern):
        load_suite(str(path))


def test_a_tiny_protocol_b_run_scores_every_task_with_outcomes_baselines_and_expert_loads(tmp_path):
    from lorabench.harness.mixture import run_mixture
    from lorabench.runner.suite import load_suite
    path = tmp_path / "tinymix.yaml"
    path.write_text(TINY)
    specs = {s.label: s for s in load_suite(str(path)).trials()}
    assert set(specs) == {"lora@a", "moelora@a", "mixlora@a"}
    recs = {k: run_mixture(s, progress=False) for k, s in specs.items()}
    for label, r in recs.items():
        mix = r["mixture"]
        assert mix["train_tasks"] == ["socialiqa", "quartz"] and mix["held_out_tasks"] == ["rt-mc"]
        assert set(mix["tasks"]) == {"socialiqa", "quartz", "rt-mc"} and mix["tasks"]["rt-mc"]["held_out"]
        assert all(len(t["outcomes"]) == 8 == t["n_eval"] for t in mix["tasks"].values())
        assert r["score"] == pytest.approx((mix["tasks"]["socialiqa"]["score"] + mix["tasks"]["quartz"]["score"]) / 2)
        assert r["metrics"]["held_out"] == mix["tasks"]["rt-mc"]["score"]
        assert r["trained_steps"] == 4 and r["final_loss"] is not None
    # zero-shot: the same base model for every method (B = 0 at init), so the same outcomes
    assert recs["lora@a"]["mixture"]["zero_shot"] == recs["moelora@a"]["mixture"]["zero_shot"]
    # the mixtures record their experts' load per task; lora has no router
    assert recs["lora@a"]["mixture"]["tasks"]["quartz"]["router"] == {}
    moe = recs["moelora@a"]["mixture"]["tasks"]
    assert len(moe["quartz"]["router"]["expert_load"]) == 2
    assert moe["quartz"]["router"]["expert_load"] != moe["socialiqa"]["router"]["expert_load"]   # its task's gate
    assert recs["mixlora@a"]["method_metrics"]["aux_loss_last"] > 0       # the balancing loss was trained on
    # the report's section reads these records: per task, zero-shot rows and the averages; not the main leaderboard
    from lorabench.report.build import write_report
    from lorabench.report.mixture import mixture_frame
    records = [{**r, "status": "ok", "label": label, "seed": 0, "method": specs[label].method, "task": specs[label].task,
                "suite": "tinymix"} for label, r in recs.items()]
    f = mixture_frame(records)
    row = f[(f.task == "quartz") & (f.method == "moelora")].iloc[0]
    assert row["score"] == pytest.approx(moe["quartz"]["score"]) and row["n_seeds"] == 1
    assert set(f[f.task == "average (held-out, 1)"].method) == {"zero-shot", "lora", "moelora", "mixlora"}
    files = write_report(records, tmp_path / "report", ["md", "csv"])
    assert "mixture.csv" in {p.name for p in files}
    md = (tmp_path / "report" / "LEADERBOARD.md").read_text()
    assert "## Mixtures of LoRA experts" in md and "moelora" in md.split("## Mixtures of LoRA experts")[1]
    assert "moelora" not in md.split("## Mixtures of LoRA experts")[0], "a mixture record is not a single-task row"
