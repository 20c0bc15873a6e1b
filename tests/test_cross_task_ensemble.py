"""LoRA ensembles (arXiv 2310.00035, issue 17): the ensemble's prediction is the mean of the members' predictive
distributions over the options (not a vote, not the mean log-likelihood), its bookkeeping (members' accuracies,
disagreement, negative log-likelihood), and a tiny protocol (b) run in which M members from different seeds are
trained and scored, member 0 being exactly the `lora` of the same seed."""
from __future__ import annotations

import math

import pytest
import torch

from lorabench.methods.cross_task.lora_ensemble import ensemble, member_seed


def test_the_ensemble_averages_the_members_probabilities_over_the_options():
    # two questions with options (0, 1), three members; log-likelihoods chosen so that the mean probability
    # differs from a majority vote (question 0) and from the mean log-likelihood (question 1)
    lp = [[[0.0, -6.0], [-10.0, 0.0]],      # member 0: sure of option 0, then sure of option 1
          [[-0.8, 0.0], [0.0, -1.5]],       # members 1 and 2: mildly option 1, then option 0
          [[-0.8, 0.0], [0.0, -1.5]]]
    out = ensemble(lp, labels=[0, 0])
    p = [[torch.softmax(torch.tensor(q, dtype=torch.float64), 0) for q in m] for m in lp]
    p_ens = [sum(m[q] for m in p) / 3 for q in range(2)]                       # (1/M) Σ_m p_m(y | x)
    assert out["pred"] == [int(x.argmax()) for x in p_ens] == [0, 0]
    votes = [int(m[0].argmax()) for m in p]
    assert max(set(votes), key=votes.count) == 1                               # a vote would say 1 on question 0
    mean_ll = torch.tensor([m[1] for m in lp]).mean(0)
    assert int(mean_ll.argmax()) == 1                                          # the mean log-likelihood, on question 1
    assert out["accuracy"] == 1.0 and out["correct"] == [1, 1]
    assert out["member_accuracy"] == [0.5, 0.5, 0.5]
    assert out["nll"] == pytest.approx(-(math.log(float(p_ens[0][0])) + math.log(float(p_ens[1][0]))) / 2)
    assert out["member_nll"][1] == pytest.approx(-(math.log(float(p[1][0][0])) + math.log(float(p[1][1][0]))) / 2)
    # pairs (0,1) and (0,2) disagree on both questions, (1,2) on none
    assert out["disagreement"] == pytest.approx(2 / 3) and out["any_disagreement"] == 1.0


def test_members_that_agree_have_zero_disagreement_and_the_ensemble_of_one_is_the_member():
    lp = [[[-1.0, -2.0, -3.0], [-2.0, -0.5, -4.0]]]
    one = ensemble(lp, labels=[0, 2])
    assert one["pred"] == [0, 1] and one["accuracy"] == 0.5 and one["disagreement"] == 0.0
    same = ensemble(lp * 3, labels=[0, 2])
    assert same["pred"] == one["pred"] and same["nll"] == pytest.approx(one["nll"])
    assert same["disagreement"] == 0.0 and same["any_disagreement"] == 0.0
    with pytest.raises(ValueError, match="every member must score"):
        ensemble([lp[0], lp[0][:1]], labels=[0, 2])


def test_member_seeds_are_distinct_and_member_0_is_the_trial_seed():
    seeds = {member_seed(s, m) for s in range(5) for m in range(8)}
    assert len(seeds) == 40 and member_seed(3, 0) == 3


TINY = """suite: tinyens
version: 1
description: "protocol (b) on tiny-llama: an ensemble of LoRAs against the LoRA of the same seed"
seeds: [0]
train: {steps: 3, batch_size: 4, eval_batch_size: 16, warmup_steps_for_throughput: 1, lr: 5.0e-2}
mixture: {}
splits:
  a: {train: [socialiqa, quartz], held_out: [rt-mc]}
tasks:
  - {name: socialiqa, model: tiny-llama, options: {n_train: 24, n_eval: 12}}
  - {name: quartz, model: tiny-llama, options: {n_train: 24, n_eval: 12}}
  - {name: rt-mc, model: tiny-llama, options: {n_train: 24, n_eval: 12}}
methods:
  - {name: lora, options: {rank: 4, alpha: 8}}
  - {name: lora-ensemble, options: {rank: 4, alpha: 8, members: 3}}
"""


def test_a_tiny_protocol_b_ensemble_trains_m_members_from_different_seeds(tmp_path, monkeypatch):
    from lorabench.harness import cross_task
    from lorabench.harness.mixture import run_mixture
    from lorabench.runner.suite import load_suite
    monkeypatch.setattr(cross_task, "eval_cache_dir", lambda: tmp_path / "evals")
    path = tmp_path / "tinyens.yaml"
    path.write_text(TINY)
    specs = {s.label: s for s in load_suite(str(path)).trials()}
    lora, ens = (run_mixture(specs[k], progress=False) for k in ("lora@a", "lora-ensemble@a"))
    block = ens["mixture"]["ensemble"]
    assert block["members"] == 3 and block["member_seeds"] == [0, 1000, 2000]
    assert ens["trainable_params"] == 3 * lora["trainable_params"]
    for name, t in block["tasks"].items():
        # member 0 is the lora of the same seed: the same initialisation, batches and training, the same answers
        assert t["member_accuracy"][0] == lora["mixture"]["tasks"][name]["score"], name
        assert len(t["member_accuracy"]) == 3 and 0 <= t["disagreement"] <= t["any_disagreement"] <= 1
        got = ens["mixture"]["tasks"][name]
        assert got["score"] == t["accuracy"] and len(got["outcomes"]) == 12
        assert got["score"] == pytest.approx(sum(map(int, got["outcomes"])) / 12)
    # the members differ (their own seeds): their losses, and somewhere their answers
    assert len(set(block["member_final_loss"])) == 3
    assert max(t["disagreement"] for t in block["tasks"].values()) > 0
    assert ens["score"] == pytest.approx((block["tasks"]["socialiqa"]["accuracy"]
                                          + block["tasks"]["quartz"]["accuracy"]) / 2)
    assert ens["metrics"]["held_out"] == block["tasks"]["rt-mc"]["accuracy"]
