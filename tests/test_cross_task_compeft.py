"""ComPEFT (arXiv 2311.13171, issue 17): each library adapter's update (its change from its initial factors) is
sparsified to the top-k entries by magnitude and quantised to their signs times one scale α σ(τ); the compressed
candidates are averaged exactly; the initial factors are rebuilt from the adapter's id."""
from __future__ import annotations

import math

import pytest
import torch

from lorabench.methods import get_method
from lorabench.methods.cross_task.compeft import compress, compressed_state, compression_ratio
from lorabench.methods.cross_task.merging import exact_delta, merge_error
from tests.test_cross_task import SCALE, cross_task_spec, library, tiny_library  # noqa: F401 (fixture)


def test_compression_keeps_the_top_k_signs_times_one_scale():
    tau = torch.tensor([[0.5, -2.0, 0.1, 0.0], [-0.3, 1.5, -0.05, 0.8]])
    out = compress(tau, density=0.25, alpha=2.0)                     # 2 of 8 entries: -2.0 and 1.5
    sigma = tau.std(unbiased=False)
    want = torch.zeros_like(tau)
    want[0, 1], want[1, 1] = -2.0 * sigma, 2.0 * sigma
    torch.testing.assert_close(out, want)
    assert set(compress(tau, 1.0, 1.0).unique().tolist()) <= {-float(sigma), 0.0, float(sigma)}   # ternary
    assert compression_ratio(0.1) == pytest.approx(32 / (-(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9)) + 0.1))
    assert compression_ratio(0.1) > compression_ratio(0.5) > 1 and compression_ratio(1.0) == 32.0


def test_the_update_is_compressed_from_the_initial_factors_and_the_alpha_with_the_lowest_kshot_loss_kept():
    states, initial = library(3), library(3, seed=1)
    s = compressed_state(states[0], initial[0], 0.5, 1.0)
    for p in [k[: -len(".lora_A")] for k in s if k.endswith(".lora_A")]:
        tau_a = s[f"{p}.lora_A"] - initial[0][f"{p}.lora_A"]
        assert (tau_a != 0).float().mean() == pytest.approx(0.5, abs=0.05)
        assert torch.equal(torch.sign(tau_a)[tau_a != 0], torch.sign(states[0][f"{p}.lora_A"] - initial[0][f"{p}.lora_A"])[tau_a != 0])
        assert (s[f"{p}.lora_B"] != 0).float().mean() == pytest.approx(0.5, abs=0.05)
    method = get_method("compeft").from_options({"rank": 2, "density": 0.5, "alpha_grid": [0.5, 1.0, 2.0]})
    method.initial_states = initial
    want = exact_delta([compressed_state(x, x0, 0.5, 2.0) for x, x0 in zip(states, initial)], [1 / 3] * 3, SCALE)

    def loss(state):   # lowest at α = 2
        from lorabench.methods.cross_task.base import delta_weights
        got = delta_weights(state)
        return float(sum((got[p] - want[p]).pow(2).sum() for p in want))
    comp = method.compose(states, SCALE, loss, seed=0)
    assert comp.info["alpha"] == 2.0 and comp.loss_evaluations == 3 and comp.weights == [1 / 3] * 3
    assert merge_error(comp.state, want) < 1e-6
    method.initial_states = None
    with pytest.raises(ValueError, match="initial factors"):
        method.compose(states, SCALE, loss, seed=0)
    with pytest.raises(ValueError, match="alpha_grid is empty"):
        get_method("compeft").from_options({"alpha_grid": []})


def test_a_compeft_trial_records_the_compression_and_the_accuracy_kept(tiny_library):
    from lorabench import assets
    from lorabench.harness.multitask import LibraryConfig, initial_factors, load_library_adapter
    from lorabench.harness.trial import run_trial
    rec = run_trial(cross_task_spec("compeft", {"alpha_grid": [1.0, 2.0]}), progress=False)
    ct = rec["cross_task"]
    assert ct["info"]["alpha"] in (1.0, 2.0) and ct["loss_evaluations"] == 2
    assert ct["info"]["compression_ratio"] == pytest.approx(compression_ratio(0.1), abs=1e-3)
    assert ct["uncompressed"]["outcomes"]["hash"] == rec["outcomes"]["hash"]
    if ct["uncompressed"]["score"] > 0:
        assert ct["accuracy_kept"] == pytest.approx(rec["score"] / ct["uncompressed"]["score"], abs=1e-5)
    # the initial factors are rebuilt from the adapter id: 2 steps at lr 5e-4 moved A by little from them
    base = assets.load_model("tiny-llama", head="causal-lm", seed=0).model
    lib = LibraryConfig(rank=2, alpha=4.0)
    stem = ct["library"]["rt-mc"]
    trained = load_library_adapter(tiny_library / f"{stem}.safetensors")
    for seed, moved in ((int(stem[:8], 16), lambda r: r < 0.05), (int(stem[:8], 16) + 1, lambda r: r > 1.0)):
        init = initial_factors(base, lib, seed)
        assert init.keys() == {k for k in trained if k.endswith(".lora_A")}
        r = math.sqrt(sum(float((trained[k] - init[k]).pow(2).sum()) for k in init)
                      / sum(float(trained[k].pow(2).sum()) for k in init))
        assert moved(r), (seed, r)
