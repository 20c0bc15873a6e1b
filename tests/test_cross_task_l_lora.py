"""L-LoRA (arXiv 2310.04742; lorabench/methods/cross_task/l_lora.py): the LoRA module linearised around its
initial factors by torch.func.jvp, what that means at LoRA's initialisation (A gets no gradient), task arithmetic
over linearised task vectors, the task vectors' cosine similarities, and a leave-one-task-out trial on tiny-llama
with the linearised library."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lorabench.methods import get_method
from lorabench.methods.cross_task.base import delta_weights
from lorabench.methods.cross_task.l_lora import (LinearizedVariant, library_state, task_arithmetic,
                                                 task_vector_cosines, update_gram)
from lorabench.methods.cross_task.merging import exact_delta
from lorabench.methods.lora.layer import LoraLinear
from tests.test_cross_task import LAYERS, SCALE, cross_task_spec, tiny_library  # noqa: F401 (a fixture)


def layer(variant=None, seed=0, b0=True) -> LoraLinear:
    """A 6 -> 5 layer at rank 3, scale 2, with random A0, B0 (B0 = 0 unless b0) and factors moved from them."""
    torch.manual_seed(seed)
    m = LoraLinear(nn.Linear(6, 5), 3, SCALE, variant=variant)
    with torch.no_grad():
        if variant is not None:
            m.lora_B0.copy_(torch.randn(5, 3) if b0 else torch.zeros(5, 3))
            m.lora_B.copy_(m.lora_B0 + torch.randn(5, 3))
            m.lora_A.add_(torch.randn(3, 6))
    return m


def test_the_linearised_module_is_its_first_order_taylor_expansion():
    m = layer(LinearizedVariant())
    x = torch.randn(4, 6, dtype=torch.float32)
    A, B, A0, B0 = m.lora_A.detach(), m.lora_B.detach(), m.lora_A0, m.lora_B0
    want = m.base(x) + SCALE * x @ (B0 @ A0 + (B - B0) @ A0 + B0 @ (A - A0)).T   # g(φ0) + ∇g(φ0)(φ − φ0)
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    # the plain module at the same factors adds the second-order term s (B − B0)(A − A0) x: not the same
    plain = m.base(x) + SCALE * x @ (B @ A).T
    assert (plain - m(x)).abs().max() > 1e-2
    torch.testing.assert_close(plain - m(x), SCALE * x @ ((B - B0) @ (A - A0)).T, atol=1e-5, rtol=1e-5)
    # delta_weight (merging) is the same linear update
    torch.testing.assert_close(m.base(x) + x @ m.delta_weight().T, m(x), atol=1e-5, rtol=1e-5)


def test_the_linearised_module_is_linear_in_the_parameters_moved():
    m = layer(LinearizedVariant(), seed=1)
    x = torch.randn(3, 6)
    A0, B0 = m.lora_A0.clone(), m.lora_B0.clone()
    d1 = (torch.randn(3, 6), torch.randn(5, 3))
    d2 = (torch.randn(3, 6), torch.randn(5, 3))

    @torch.no_grad()
    def out(dA, dB):
        m.lora_A.copy_(A0 + dA)
        m.lora_B.copy_(B0 + dB)
        return m(x)
    f0 = out(torch.zeros(3, 6), torch.zeros(5, 3))
    f1, f2 = out(*d1) - f0, out(*d2) - f0
    mixed = out(0.7 * d1[0] - 1.3 * d2[0], 0.7 * d1[1] - 1.3 * d2[1]) - f0
    torch.testing.assert_close(mixed, 0.7 * f1 - 1.3 * f2, atol=1e-4, rtol=1e-4)


def test_at_loras_initialisation_only_b_is_fine_tuned():
    """B0 = 0: the Jacobian in A is zero, so A gets no gradient, while plain LoRA's A does once B has moved."""
    x = torch.randn(4, 6)
    lin = layer(LinearizedVariant(), b0=False)
    lin(x).pow(2).sum().backward()
    assert float(lin.lora_A.grad.abs().max()) == 0.0 and float(lin.lora_B.grad.abs().max()) > 0
    plain = layer(None)
    with torch.no_grad():
        plain.lora_B.copy_(torch.randn(5, 3))
    plain(x).pow(2).sum().backward()
    assert float(plain.lora_A.grad.abs().max()) > 0
    # its library form (A0, B) is the plain LoRA that computes the linearised module exactly
    state = {f"l.{k}": v for k, v in
             {"lora_A": lin.lora_A.detach(), "lora_B": lin.lora_B.detach(), "lora_A0": lin.lora_A0,
              "lora_B0": lin.lora_B0}.items()}
    lib = library_state(state)
    assert set(lib) == {"l.lora_A", "l.lora_B"}
    with torch.no_grad():
        torch.testing.assert_close(lin.base(x) + SCALE * x @ (lib["l.lora_B"] @ lib["l.lora_A"]).T, lin(x))
    with pytest.raises(ValueError, match="B0 = 0"):
        library_state({**state, "l.lora_B0": torch.ones(5, 3)})


def linearised_library(n=3, rank=2, out=6, inp=5, seed=0) -> list[dict]:
    """n adapters stored as (A0, B_i): one shared A0 per layer, their own B."""
    g = torch.Generator().manual_seed(seed)
    A0 = {p: torch.randn(rank, inp, generator=g) for p in LAYERS}
    return [{**{f"{p}.lora_A": A0[p].clone() for p in LAYERS},
             **{f"{p}.lora_B": torch.randn(out, rank, generator=g) for p in LAYERS}} for _ in range(n)]


def test_task_arithmetic_sums_the_linearised_updates_exactly_and_keeps_the_lambda_of_lowest_kshot_loss():
    states = linearised_library()
    for lam in (0.3, 1.0):
        merged = task_arithmetic(states, lam, SCALE)
        for p in LAYERS:
            torch.testing.assert_close(merged[f"{p}.lora_A"], states[0][f"{p}.lora_A"])
        got, want = delta_weights(merged), exact_delta(states, [lam] * 3, SCALE)   # λ Σ s B_i A0: no cross terms
        for p in LAYERS:
            torch.testing.assert_close(got[p].double(), want[p], atol=1e-5, rtol=1e-5)
    method = get_method("l-lora").from_options({"lambda_grid": [0.2, 0.5, 0.9]})
    comp = method.compose(states, SCALE, lambda s: abs(float(s[f"{LAYERS[0]}.lora_B"].norm()) - 0.5 * float(
        task_arithmetic(states, 1.0, SCALE)[f"{LAYERS[0]}.lora_B"].norm())), seed=0)
    assert comp.info["lambda"] == 0.5 and comp.weights == [0.5] * 3 and comp.loss_evaluations == 3
    # adapters from different initialisations cannot be added as task vectors
    other = linearised_library(seed=1)
    with pytest.raises(ValueError, match="another initial A"):
        task_arithmetic([states[0], other[1]], 1.0, SCALE)
    with pytest.raises(ValueError, match="lambda_grid is empty"):
        get_method("l-lora").from_options({"lambda_grid": []})
    with pytest.raises(ValueError, match="no forward-mode rule"):
        get_method("l-lora").from_options({"kernel": "fused"})


def test_task_vector_cosines_are_those_of_the_flattened_updates():
    states = linearised_library(n=3, seed=2)
    flat = [torch.cat([d.flatten() for _, d in sorted(delta_weights(s, SCALE).items())]).double() for s in states]
    G = update_gram(states, SCALE)
    for i in range(3):
        for j in range(3):
            assert float(G[i, j]) == pytest.approx(float(flat[i] @ flat[j]), rel=1e-6)
    cos = task_vector_cosines(states, SCALE)
    c01 = float(flat[0] @ flat[1] / flat[0].norm() / flat[1].norm())
    assert cos["cos"][0][1] == pytest.approx(c01, abs=1e-6) and cos["cos"][0][0] == pytest.approx(1.0)
    # orthogonal updates (disjoint rows of B) have cos 0; an update and its double have cos 1
    a = {f"{p}.lora_A": torch.eye(2, 5) for p in LAYERS}
    e = [{**a, **{f"{p}.lora_B": torch.zeros(6, 2).index_fill(0, torch.tensor([i]), 1.0) for p in LAYERS}} for i in (0, 1)]
    assert task_vector_cosines(e, SCALE)["mean_abs_cos"] == 0.0
    double = {**e[0], **{f"{p}.lora_B": 2 * e[0][f"{p}.lora_B"] for p in LAYERS}}
    assert task_vector_cosines([e[0], double], SCALE)["mean_abs_cos"] == pytest.approx(1.0)


def test_an_l_lora_adapter_saves_its_expansion_point(tmp_path):
    from lorabench import assets
    from lorabench.methods.base import ApplyContext, load_adapter
    loaded = assets.load_model("tiny-llama", head="causal-lm", seed=0)
    method = get_method("l-lora").from_options({"rank": 2, "alpha": 4.0})
    torch.manual_seed(0)
    model = method.apply(loaded.model, ApplyContext("llama", []))
    with torch.no_grad():
        for m in method.lora_layers(model):
            m.lora_B.normal_()
            m.lora_A.add_(0.1)    # off the expansion point in A too: the saved A0 matters
    path = tmp_path / "a.safetensors"
    method.save_adapter(model, str(path))
    torch.manual_seed(1)   # another initialisation: only the saved A0/B0 give the same model back
    again, _ = load_adapter(assets.load_model("tiny-llama", head="causal-lm", seed=0).model, str(path),
                            ApplyContext("llama", []))
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_leave_one_task_out_trial_on_the_linearised_library(tiny_library):  # noqa: F811 (the fixture)
    from safetensors import safe_open

    from lorabench.harness.multitask import load_library_adapter
    from lorabench.harness.trial import run_trial
    rec = run_trial(cross_task_spec("l-lora", {"lambda_grid": [0.5, 1.0]}), progress=False)
    ct = rec["cross_task"]
    assert ct["candidates"] == ["sarcasm-mc", "rt-mc"] and ct["loss_evaluations"] == 2
    assert ct["info"]["lambda"] in (0.5, 1.0) and ct["weights"] == [ct["info"]["lambda"]] * 2
    # its own library (variant l-lora), beside the plain one it compares with: 2 + 2 adapters, no held-out one, and
    # the multi-task reference (a baseline of every trial)
    files = sorted(p.stem for p in tiny_library.iterdir())
    assert len(files) == 5 and set(ct["library"].values()) < set(files)
    assert ct["baselines"]["multitask-lora"]["adapter"] in files
    states = [load_library_adapter(tiny_library / f"{ct['library'][t]}.safetensors") for t in ct["candidates"]]
    for k in states[0]:   # one initialisation A0 for every task, B trained
        if k.endswith(".lora_A"):
            assert torch.equal(states[0][k], states[1][k])
    assert any(float(v.abs().max()) > 0 for k, v in states[0].items() if k.endswith(".lora_B"))
    with safe_open(str(tiny_library / f"{ct['library']['rt-mc']}.safetensors"), framework="pt") as f:
        info = json.loads(f.metadata()["library"])
    assert info["variant"] == "l-lora" and info["a_grad_max"] == 0 and info["b_update_norm"] > 0
    d = ct["disentanglement"]
    assert set(d) == {"linearized", "plain"} and all(0 <= d[k]["mean_abs_cos"] <= 1 for k in d)
    assert rec["n_eval"] == 6 and 0 <= rec["score"] <= 1
    assert ct["baselines"]["best-single"]["adapter"] in ct["candidates"]
