"""Token-level adaptation (arXiv 2311.10847, issue 17): the router's weights (the largest cosine similarity to a
domain centroid sharpened by the temperature, then a softmax), the two combinations of the weighted adapters (peft's
factor-wise `linear`, as the paper's code, and the exact weighted sum), and the token-by-token scoring of the
held-out task in the leave-one-task-out protocol."""
from __future__ import annotations

import pytest
import torch

from lorabench.methods import get_method
from lorabench.methods.cross_task.base import delta_weights
from lorabench.methods.cross_task.merging import exact_delta, merge_error, peft_merge
from lorabench.methods.cross_task.token_level import token_weights
from tests.test_cross_task import SCALE, close, cross_task_spec, library, tiny_library  # noqa: F401 (fixture)


def test_the_largest_similarity_is_sharpened_by_the_temperature_before_the_softmax():
    sim = torch.tensor([[0.2, 0.5, 0.1], [0.9, -0.3, 0.4]])
    w = token_weights(sim, 4.0)
    want = torch.softmax(torch.tensor([[0.2, 2.0, 0.1], [3.6, -0.3, 0.4]]), dim=1)
    torch.testing.assert_close(w, want)
    torch.testing.assert_close(token_weights(sim, 1.0), torch.softmax(sim, dim=1))
    assert torch.allclose(w.sum(1), torch.ones(2)) and (w[:, 1].argmax() == 0)


def test_linear_is_peft_linear_and_exact_is_the_weighted_sum_of_updates():
    states, w = library(3), [0.6, 0.3, 0.1]
    linear = get_method("token-level").from_options({"rank": 2}).combine(states, w, SCALE)
    close(delta_weights(linear), delta_weights(peft_merge(states, w, SCALE, "linear")), rtol=1e-4, atol=1e-5)
    exact = get_method("token-level").from_options({"rank": 2, "combination": "exact"}).combine(states, w, SCALE)
    assert merge_error(exact, exact_delta(states, w, SCALE)) < 1e-6
    assert merge_error(linear, exact_delta(states, w, SCALE)) > 0.1          # the factor-wise cross terms
    with pytest.raises(ValueError, match="not one of linear, exact"):
        get_method("token-level").from_options({"combination": "mean"})
    with pytest.raises(ValueError, match="re-weights the adapters at every token"):
        get_method("token-level").from_options({}).compose(states, SCALE, lambda s: 0.0, seed=0)


def test_token_by_token_scoring_equals_the_tasks_own_scoring_when_every_weighting_is_one_adapter():
    """Two copies of one adapter, combined exactly: whatever the weights, the adapter itself. Scoring each option
    token after its own prefix must then give the task's own predictions (full sequences, one adapter)."""
    from lorabench import assets
    from lorabench.harness.cross_task import Composer, token_level_evaluate
    from lorabench.harness.train import TrainConfig
    from lorabench.methods.cross_task.base import layer_prefixes
    from lorabench.tasks import get_task
    loaded = assets.load_model("tiny-llama", head="causal-lm", seed=0)
    layers = [n for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    g = torch.Generator().manual_seed(0)
    state = {}
    for n in layers:
        lin = loaded.model.get_submodule(n)
        state[f"{n}.lora_A"] = torch.randn(2, lin.in_features, generator=g)
        state[f"{n}.lora_B"] = torch.randn(lin.out_features, 2, generator=g) * 0.5
    task = get_task("socialiqa").from_options({"n_eval": 5})                  # 3 options of several tokens each
    method = get_method("token-level").from_options({"rank": 2, "combination": "exact", "adapter_examples": 4})
    comp, ev = token_level_evaluate(method, task, ["quartz", "rt-mc"], [state, state], SCALE, loaded.model,
                                    loaded.tokenizer, {}, TrainConfig(eval_batch_size=16))
    alone = task.evaluate(Composer(loaded.model, layer_prefixes(state), 2).load(
        {k: v * SCALE if k.endswith(".lora_B") else v for k, v in state.items()}), loaded.tokenizer, 16)
    assert ev.outcomes.pred == alone.outcomes.pred and ev.metrics["accuracy"] == alone.metrics["accuracy"]
    info = comp.info
    assert info["forwards"] == info["prefixes"] > 5          # more prefixes than questions: options of several tokens
    assert sum(comp.weights) == pytest.approx(1.0, abs=1e-5)
    assert 0 < info["weight_entropy"] <= info["uniform_entropy"]


def test_a_token_level_trial_records_its_routing(tiny_library):
    from lorabench.harness.trial import run_trial
    rec = run_trial(cross_task_spec("token-level", {"adapter_examples": 4}), progress=False)
    ct = rec["cross_task"]
    assert ct["candidates"] == ["sarcasm-mc", "rt-mc"] and ct["loss_evaluations"] == 0
    info = ct["info"]
    assert info["combination"] == "linear" and info["prefixes"] >= rec["n_eval"] == 6
    assert sum(info["top_adapter_fraction"].values()) == pytest.approx(1.0, abs=1e-5)
    assert sum(ct["weights"]) == pytest.approx(1.0, abs=1e-5) and 0 <= rec["score"] <= 1
    assert ct["baselines"]["zero-shot"]["outcomes"]["hash"] == rec["outcomes"]["hash"]
