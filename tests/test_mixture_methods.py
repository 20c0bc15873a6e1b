"""Mechanism tests of the mixtures of LoRA experts built beside the shared mixture layer (issue 17): X-LoRA's two
passes and frozen experts.

Everything here is small tensors or the smoke suite's 2-layer random tiny models (seconds).
"""
from __future__ import annotations

import pytest
import torch

from lorabench.harness.train import TrainConfig, train
from lorabench.methods import get_method
from tests.methods.tester import RandomTask, batch_for, tiny_model


# -- X-LoRA (arXiv 2402.07148) ----------------------------------------------------------------------------

def xlora(kind: str = "llama", **options):
    base, ctx = tiny_model(kind)
    original, _ = tiny_model(kind)            # the same weights (same seed): the base model, untouched
    torch.manual_seed(0)
    method = get_method("x-lora").from_options({"experts": 3, "rank": 2, **options})
    model = method.apply(base, ctx)
    for m in method.mixture_layers(model):    # experts away from B = 0, so the two passes differ
        torch.nn.init.normal_(m.lora_B, 0, 0.5)
    return model.eval(), method, original.eval()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_xlora_scaling_head_reads_the_base_models_hidden_states_and_gates_each_layer_by_its_own_scalings(kind):
    model, method, original = xlora(kind)
    b = batch_for(kind)
    seen = {}
    method.head.register_forward_hook(lambda mod, inp, out: seen.update(h=inp[0].detach(), logits=out.detach()))
    inputs = {}
    for i, m in enumerate(method.mixture_layers(model)):
        m.register_forward_hook(lambda mod, inp, out, i=i: inputs.update({i: (inp[0].detach(), out.detach())}))
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ref = original(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    # pass 1: adapters off, so the head reads the base model's last hidden states
    torch.testing.assert_close(seen["h"], ref.hidden_states[-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, ref.logits, atol=1e-3)          # pass 2: the experts act
    lam = torch.softmax(seen["logits"], -1)                          # (B, T, L, E)
    layers = method.mixture_layers(model)
    assert lam.shape[2] == len(layers) and lam.shape[3] == 3
    torch.testing.assert_close(method.routing.scalings, lam)
    for i in (0, len(layers) - 1):                                  # layer l adds Σ_e λ[t, l, e] s B_e A_e x_t
        m, (x, y) = layers[i], inputs[i]
        g = lam[:, :, i] if x.dim() == 3 else lam[:, 0, i]
        x3, g3 = (x, g) if x.dim() == 3 else (x[:, None], g[:, None])
        expect = m.base(x3) + sum(g3[..., e:e + 1] * (x3 @ m.delta_weight(e).T) for e in range(3))
        torch.testing.assert_close(y, expect if x.dim() == 3 else expect[:, 0], atol=1e-5, rtol=1e-5)
    # layerwise: the layers' scalings differ; not layerwise: one set for every layer
    assert not torch.allclose(lam[:, :, 0], lam[:, :, 1])
    model2, method2, _ = xlora(kind, layerwise=False)
    with torch.no_grad():
        model2(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    assert method2.routing.scalings.shape[2] == 1


def test_xlora_top_k_keeps_k_scalings_per_token_and_layer_renormalised_as_a_softmax_of_their_logits():
    model, method, _ = xlora(router="topk", top_k=2)
    b = batch_for("llama")
    with torch.no_grad():
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    m = method.mixture_layers(model)[2]
    x = torch.randn(4, 12, m.in_features)
    g, p, _ = m.gates(x)
    assert ((g > 0).sum(-1) == 2).all()
    logits = (p.log())                                                # softmax logits up to a constant per token
    top = logits.topk(2, -1)
    soft = torch.zeros_like(p).scatter(-1, top.indices, torch.softmax(top.values, -1))
    torch.testing.assert_close(g, soft)


def test_xlora_trains_the_experts_first_then_freezes_them_and_trains_only_the_scaling_head():
    base, ctx = tiny_model("llama")
    torch.manual_seed(0)
    method = get_method("x-lora").from_options({"experts": 2, "rank": 2, "teacher_forcing": 0.5})
    model = method.apply(base, ctx)
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    head = {n: p.detach().clone() for n, p in method.head.named_parameters()}
    snapshots = []

    step_end = method.on_step_end

    def spy(state):   # the parameters after each step, through the method's step hook
        step_end(state)
        snapshots.append(({n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n},
                          {n: p.detach().clone() for n, p in method.head.named_parameters()}))
    method.on_step_end = spy
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_ratio=0.0, schedule="constant",
                      warmup_steps_for_throughput=0)
    result = train(model, method, RandomTask("llama"), None, cfg, seed=0, progress=False)
    mm = result.method_metrics
    assert mm["teacher_forced_steps"] == 3 and mm["frozen_expert_params"] == sum(p.numel() for p in experts.values())
    first, last_forced = snapshots[0], snapshots[2]
    # stage 1: expert 0 (task 0's) trains, the head does not (its scalings are not used)
    assert any(not torch.equal(first[0][n], experts[n]) for n in experts)
    assert all(torch.equal(last_forced[1][n], head[n]) for n in head)
    # stage 2: the experts stay frozen, the head trains
    assert all(torch.equal(snapshots[-1][0][n], last_forced[0][n]) for n in experts)
    assert any(not torch.equal(snapshots[-1][1][n], last_forced[1][n]) for n in head)
    assert not any(p.requires_grad for p in method.expert_parameters(model))
    # the scalings' entropy per block (2 blocks), below uniform's log E only if the head moved them
    assert len(mm["scaling_entropy_by_depth"]) == 2 and 0 < mm["router_entropy"] <= torch.log(torch.tensor(2.)) + 1e-6
    assert mm["tokens_per_s_experts_stage"] > 0 and mm["tokens_per_s_head_stage"] > 0
    # saved adapters keep the frozen experts
    assert set(method.adapter_state_dict(model)) >= set(experts)


def test_xlora_refuses_a_key_value_cache_and_bad_configurations():
    model, method, _ = xlora()
    b = batch_for("llama")
    with torch.no_grad():
        out = model(input_ids=b["input_ids"][:, :6], use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        with pytest.raises(ValueError, match="key-value cache"):
            model(input_ids=b["input_ids"][:, 6:], past_key_values=cache)
    for options, pattern in [({"teacher_forcing": 0.0}, "head gets no gradient"),
                             ({"teacher_forcing": 1.0}, "no step to train the scaling head"),
                             ({"router": "task"}, "softmax over the experts"),
                             ({"level": "sequence"}, "level=token"), ({"balance": "switch"}, "balance=none")]:
        with pytest.raises(Exception, match=pattern):
            get_method("x-lora").from_options(options)


# -- MixLoRA of Shen et al. (arXiv 2402.15896): conditional factor selection --------------------------------

def cfs_layer(seed: int = 0, k: int = 12, d: int = 10, **options):
    from lorabench.methods.cross_task.mixlora_cfs import FactorSelectLinear, MixLoRACFSConfig
    from lorabench.methods.cross_task.mixture import Routing
    torch.manual_seed(seed)
    m = FactorSelectLinear(torch.nn.Linear(k, d), MixLoRACFSConfig(**{"factors": 8, "rank": 3, **options}), Routing())
    with torch.no_grad():
        m.lora_B.normal_(0, 0.5)
    return m


@pytest.mark.parametrize("options", [{}, {"conditional": False}, {"scored": False}], ids=["cfs", "ifs", "hard"])
def test_mixlora_cfs_builds_each_instances_rank_r_update_from_r_factors_of_each_pool(options):
    m = cfs_layer(**options).eval()
    x = torch.randn(3, 5, 12)
    m.routing.mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = m(x)
    xbar = m.condition(x)
    torch.testing.assert_close(xbar[1], x[1, :3].mean(0))                     # padding is not part of x̄
    idx_A, w_A, idx_B, w_B = m.select(xbar)
    assert idx_A.shape == idx_B.shape == (3, 3) and all(len(set(r.tolist())) == 3 for r in (*idx_A, *idx_B))
    for b in range(3):                                                       # W0 x + s Σ_j w b_{S_B(j)} a_{S_A(j)}^T x
        wa, wb = (w_A[b], w_B[b]) if m.c.scored else (torch.ones(3), torch.ones(3))
        dw = sum(m.scale * wa[j] * wb[j] * torch.outer(m.lora_B[:, idx_B[b, j]], m.lora_A[idx_A[b, j]])
                 for j in range(3))
        torch.testing.assert_close(out[b], m.base(x[b]) + x[b] @ dw.T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dw, m.delta_weight_for(idx_A[b], wa, idx_B[b], wb), atol=1e-6, rtol=1e-5)
    # one selection per instance: the same factors for all its tokens; it is a rank-r update
    assert torch.linalg.matrix_rank(m.delta_weight_for(idx_A[0], w_A[0], idx_B[0], w_B[0])) == 3


def test_mixlora_cfs_selects_b_given_as_choice_and_ifs_does_not():
    m = cfs_layer(ifs_weight=5.0).eval()
    xbar = torch.randn(64, 12)
    idx_A, _, idx_B, _ = m.select(xbar)
    # the same x̄ with other A-factors chosen (A's router changed, B's router untouched): B's choice follows A's
    with torch.no_grad():
        m.router_A.weight.copy_(torch.randn_like(m.router_A.weight) * 3)
    idx_A2, _, idx_B2, _ = m.select(xbar)
    assert not torch.equal(idx_A, idx_A2) and not torch.equal(idx_B, idx_B2)
    # B's scores are softmax(W_B x̄) + λ Σ_j softmax(V_j a_{S_A(j)})
    p_B = torch.softmax(m.router_B(xbar), -1) + 5.0 * sum(
        torch.softmax(m.lora_A[idx_A2[:, j]] @ m.cond_B[j], -1) for j in range(3))
    assert torch.equal(idx_B2, p_B.topk(3, -1).indices)
    ind = cfs_layer(conditional=False).eval()                                # IFS for B: A's choice does not matter
    _, _, b1, _ = ind.select(xbar)
    with torch.no_grad():
        ind.router_A.weight.copy_(torch.randn_like(ind.router_A.weight) * 3)
    _, _, b2, _ = ind.select(xbar)
    assert torch.equal(b1, b2)


def test_mixlora_cfs_routers_learn_through_the_scored_weights_and_usage_is_recorded():
    base, ctx = tiny_model("llama")
    torch.manual_seed(0)
    method = get_method("mixlora-cfs").from_options({"factors": 6, "rank": 2})
    model = method.apply(base, ctx)
    for m in method.mixture_layers(model):
        torch.nn.init.normal_(m.lora_B, 0, 0.1)
    model.train()
    model(**batch_for("llama")).loss.backward()
    m = method.mixture_layers(model)[0]
    assert float(m.router_A.weight.grad.abs().sum()) > 0 and float(m.router_B.weight.grad.abs().sum()) > 0
    assert float(m.cond_B.grad.abs().sum()) > 0
    stats = method.router_metrics(model)
    assert sum(stats["factor_usage_A"]) == pytest.approx(2.0, abs=1e-3) and sum(stats["factor_usage_B"]) == pytest.approx(2.0, abs=1e-3)
    assert 0 < stats["factors_used_fraction"] <= 1 and 1 <= stats["distinct_pairs"] <= 36
    hard = get_method("mixlora-cfs").from_options({"factors": 6, "rank": 2, "scored": False})
    model2 = hard.apply(tiny_model("llama")[0], ctx)
    model2.train()
    model2(**batch_for("llama")).loss.backward()
    assert hard.mixture_layers(model2)[0].router_A.weight.grad is None   # hard selection: no gradient to the router
    with pytest.raises(Exception, match="more factors than the pool"):
        get_method("mixlora-cfs").from_options({"factors": 2, "rank": 3})


# -- MoCLE (arXiv 2312.12379): k-means clusters of instruction embeddings, a universal expert ----------------

def planted_batches(n_batches: int = 4, n: int = 8, t: int = 10):
    """Two tasks whose examples use disjoint, narrow token ranges (task 0: ids 1-4, task 1: ids 60-63), alternating."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        task = torch.arange(n) % 2
        ids = torch.where(task[:, None] == 0, torch.randint(1, 5, (n, t), generator=g),
                          torch.randint(60, 64, (n, t), generator=g))
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "task_ids": task})
    return out


def test_mocle_clusters_the_instructions_by_k_means_and_routes_each_example_by_its_nearest_centroid(tmp_path):
    from lorabench.methods.base import load_adapter
    base, ctx = tiny_model("llama")
    torch.manual_seed(0)
    method = get_method("mocle").from_options({"experts": 3, "rank": 2, "clusters": 2, "fit_examples": 32})
    model = method.apply(base, ctx).eval()
    batches = planted_batches()
    stats = method.fit_clusters(batches, seed=0)
    assert stats["cluster_purity"] == 1.0 and sorted(stats["cluster_sizes"]) == [16, 16]
    with torch.no_grad():
        model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
    cl = method.routing.cluster_ids
    task = batches[0]["task_ids"]
    assert len(set(cl[task == 0].tolist())) == 1 and len(set(cl[task == 1].tolist())) == 1 and cl[0] != cl[1]
    # the embedding is the mean of the frozen input embeddings over real tokens: padding does not move an example
    ids, mask = batches[0]["input_ids"].clone(), torch.ones(8, 10, dtype=torch.long)
    mask[0, 6:] = 0
    ids2 = ids.clone()
    ids2[0, 6:] = 70
    torch.testing.assert_close(method.embed(ids, mask), method.embed(ids2, mask))
    # mixed-up planted tasks: purity drops below 1
    mixed = [{**b, "task_ids": torch.tensor([0, 0, 1, 1, 0, 1, 1, 0])} for b in planted_batches()]
    assert method.fit_clusters(mixed, seed=0)["cluster_purity"] < 1.0
    method.fit_clusters(batches, seed=0)
    # the centroids are part of the adapter: a loaded adapter routes the same way
    for m in method.mixture_layers(model):
        torch.nn.init.normal_(m.lora_B, 0, 0.5)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    path = str(tmp_path / "mocle.safetensors")
    method.save_adapter(model, path)
    loaded, method2 = load_adapter(tiny_model("llama")[0], path, ctx)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, out)
    assert torch.equal(method2.routing.cluster_ids, cl)


@pytest.mark.parametrize("universal", [True, False])
def test_mocle_activates_the_top1_cluster_expert_and_mixes_in_the_universal_expert(universal):
    base, ctx = tiny_model("llama")
    torch.manual_seed(0)
    E = 4 if universal else 3
    method = get_method("mocle").from_options({"experts": E, "rank": 2, "clusters": 3, "fit_examples": 8,
                                               "universal": universal, "temperature": 0.5})
    model = method.apply(base, ctx).eval()
    m = method.mixture_layers(model)[0]
    with torch.no_grad():
        m.lora_B.normal_(0, 0.5)
    method.routing.cluster_ids = torch.tensor([0, 1, 2, 1])
    x = torch.randn(4, 5, m.in_features)
    g, p, _ = m.gates(x)
    first = 1 if universal else 0
    logits = m.router(m.task_embedding(torch.tensor([0, 1, 2, 1])))
    q = torch.softmax(logits / 0.5, -1)                                   # softmax((W_g C_k + b_g) / τ)
    w, i = q.max(-1)
    for b in range(4):
        assert torch.equal(g[b, 0].expand(5, -1), g[b])                   # one gate per example
        expect = x[b] @ (w[b] ** 2 * m.delta_weight(first + int(i[b]))).T  # w · (w E_i(x)): the released code
        if universal:
            expect = expect + x[b] @ ((1 - w[b]) * m.delta_weight(0)).T   # + (1 - w) G(x)
        torch.testing.assert_close(m(x)[b], m.base(x[b]) + expect, atol=1e-5, rtol=1e-5)
        assert int((g[b, 0, first:] > 0).sum()) == 1
    torch.testing.assert_close(g[0, 0], m.gates(x)[0][0, 0])                 # no noise in eval
    m.train()
    assert not torch.allclose(m.gates(x)[1][0, 0], p[0, 0])                 # noise on the gate's logits in training
    b = batch_for("llama")
    with torch.no_grad(), pytest.raises(ValueError, match="key-value cache"):
        out = model(input_ids=b["input_ids"][:, :6], use_cache=True)
        model(input_ids=b["input_ids"][:, 6:], past_key_values=getattr(out, "cache", None) or out.past_key_values)
    with pytest.raises(Exception, match="fit_examples"):
        get_method("mocle").from_options({"clusters": 8, "fit_examples": 4})


# -- Fast LoRA (fLoRA, arXiv 2312.05677): per-example element-wise adapters in one batch ---------------------

def test_fast_lora_gives_each_example_its_own_elementwise_adapter_in_one_pass():
    from lorabench.methods.cross_task.fast_lora import FastLoraConfig, FastLoraLinear
    from lorabench.methods.cross_task.mixture import Routing
    torch.manual_seed(0)
    routing = Routing()
    m = FastLoraLinear(torch.nn.Linear(12, 10), FastLoraConfig(adapters=3, rank=2), routing)
    x = torch.randn(4, 5, 12)
    torch.testing.assert_close(m(x), m.base(x))                                # W_i = W0 at init
    with torch.no_grad():
        m.lora_A.normal_(1, 0.5)
        m.lora_B.normal_(1, 0.5)
    routing.task_ids = torch.tensor([0, 2, -1, 2])
    out = m(x)
    for i, t in enumerate([0, 2, -1, 2]):
        W = m.base.weight if t < 0 else m.base.weight * m.delta(t)             # W_i = W0 ∘ Σ_j a_ij b_ij^T
        torch.testing.assert_close(out[i], x[i] @ W.T + m.base.bias, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[1], m.base(x[1]))
    torch.testing.assert_close(m.rows, torch.tensor([5., 0., 2., 1.]))        # adapters 0, 1, 2, none (both calls)
    routing.task_ids = torch.tensor([0, 3, 0, 0])
    with pytest.raises(ValueError, match="no fast-lora adapter"):
        m(x)


def test_fast_lora_benchmark_variants_compute_the_same_adapted_layer():
    from lorabench.bench.fast_lora import Config, inputs, variants
    d = inputs(Config(examples=5, tokens=3, n_in=16, n_out=12, rank=2, adapters=3))
    fns = variants(d)
    x, W, ids = d["x"], d["W"], d["ids"]
    flora_ref = torch.stack([x[i] @ (W * torch.einsum("jo,jk->ok", d["fa"][l], d["fb"][l])).T
                             for i, l in enumerate(ids.tolist())])
    torch.testing.assert_close(fns["flora"](), flora_ref, atol=1e-5, rtol=1e-5)
    lora_ref = torch.stack([x[i] @ (W + 2.0 * d["B"][l] @ d["A"][l]).T for i, l in enumerate(ids.tolist())])
    torch.testing.assert_close(fns["loop"](), lora_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fns["bgmv"](), lora_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fns["base"](), x @ W.T + d["bias"])


# -- the four through protocol (b) on tiny-llama -----------------------------------------------------------

@pytest.mark.slow   # 4 trials, 9 evaluations each of full sequences: 1-2 minutes on a shared core
def test_protocol_b_trains_and_scores_x_lora_mixlora_cfs_mocle_and_fast_lora(tmp_path):
    from lorabench.harness.mixture import run_mixture
    from lorabench.runner.suite import load_suite
    from tests.test_mixture import TINY
    text = TINY.replace("suite: tinymix", "suite: tinymix4").replace("train: {steps: 4,", "train: {steps: 6,")
    methods = text.index("methods:")
    text = text[:methods] + """methods:
  - {name: x-lora, options: {experts: 2, rank: 2}}
  - {name: mixlora-cfs, options: {factors: 6, rank: 2}}
  - {name: mocle, options: {experts: 3, rank: 2, clusters: 2, fit_examples: 8}}
  - {name: fast-lora, options: {adapters: 2, rank: 2}}
"""
    path = tmp_path / "tinymix4.yaml"
    path.write_text(text)
    recs = {s.method: run_mixture(s, progress=False) for s in load_suite(str(path)).trials()}
    for name, r in recs.items():
        tasks = r["mixture"]["tasks"]
        assert set(tasks) == {"socialiqa", "quartz", "rt-mc"} and r["trained_steps"] == 6, name
        assert all(len(t["outcomes"]) == 8 and t["router"] for t in tasks.values()), name
    x = recs["x-lora"]["method_metrics"]
    assert x["teacher_forced_steps"] == 3 and x["frozen_expert_params"] > 0 and len(x["scaling_entropy_by_depth"]) == 2
    assert "scaling_entropy_by_depth" in recs["x-lora"]["mixture"]["tasks"]["rt-mc"]["router"]
    c = recs["mixlora-cfs"]["mixture"]["tasks"]["quartz"]["router"]
    assert sum(c["factor_usage_A"]) == pytest.approx(2.0, abs=1e-3)
    m = recs["mocle"]["method_metrics"]
    assert sum(m["cluster_sizes"]) == 8 and 0.5 <= m["cluster_purity"] <= 1.0      # two tasks, fitted on 8 examples
    f = recs["fast-lora"]["mixture"]["tasks"]
    assert f["socialiqa"]["router"]["adapter_use"] == [1.0, 0.0, 0.0]            # task 0: adapter 0
    assert f["quartz"]["router"]["adapter_use"] == [0.0, 1.0, 0.0]               # task 1: adapter 1
    assert f["rt-mc"]["router"]["adapter_use"] == [0.0, 0.0, 1.0]                # held out: no adapter
    assert f["rt-mc"]["outcomes"] == recs["fast-lora"]["mixture"]["zero_shot"]["rt-mc"]["outcomes"]   # W0 alone


def test_resuming_a_protocol_b_suite_checks_the_split_hash_it_recorded(tmp_path):
    """A protocol (b) record carries the hash of all its tasks' splits (run_mixture); resuming over it must compare
    that hash, not the first task's own (which refused every resume of `run mixture`)."""
    from lorabench.errors import UserError
    from lorabench.harness.mixture import split_tasks
    from lorabench.harness.sequence import sequence_split_hash
    from lorabench.runner.run import check_splits
    from lorabench.runner.suite import load_suite, trial_id
    from tests.test_mixture import TINY
    path = tmp_path / "tinymix.yaml"
    path.write_text(TINY)
    spec = load_suite(str(path)).trials()[0]
    tasks = split_tasks(spec.mixture["train"], "m") + split_tasks(spec.mixture["held_out"], "m")
    good = sequence_split_hash([t.split().hash for t in tasks])
    record = {"trial_id": trial_id(spec), "status": "ok", "split_hash": good}
    check_splits([record], {trial_id(spec): spec}, tmp_path / "r.jsonl")
    with pytest.raises(UserError, match="another split"):
        check_splits([{**record, "split_hash": "0" * 16}], {trial_id(spec): spec}, tmp_path / "r.jsonl")
