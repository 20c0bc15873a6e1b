"""LoRA ensembles (Wang, Aitchison, Rudolph, "LoRA ensembles for large language model fine-tuning",
arXiv 2310.00035): a deep ensemble whose members are M LoRA adapters on one frozen base model, each fine-tuned
from its own random initialisation; the prediction averages the members' predictive distributions.

For a multiple-choice question with options y (the paper's multiple-choice QA setting, answers scored by the
model's likelihood), member m's predictive distribution is the softmax over the options of its log-likelihoods,

    p_m(y | x) = exp(ℓ_m(y)) / Σ_y' exp(ℓ_m(y'))                       (member m, sec. 3)
    p_ens(y | x) = (1/M) Σ_m p_m(y | x)                                 (the ensemble's prediction, sec. 3)

and the ensemble predicts argmax_y p_ens(y | x). Every member is a plain `lora` adapter; member m is initialised
and fed its batches from its own seed (`member_seed`), so members differ by initialisation and data order, as the
members of a deep ensemble do. The cross-task protocol (b) (lorabench/harness/mixture.py) trains the M members on
the round-robin multi-task batches of a split of the pool, one after the other through the one training loop, and
scores the ensemble on every training task and every held-out task (the paper's in-distribution and
out-of-distribution evaluations); each record keeps every member's accuracy, the ensemble's, the members'
disagreement and the negative log-likelihood of the correct option (the paper's calibration measure).

A single-task trial of `lora-ensemble` (the smoke suite, the methods table) trains one member: a LoRA.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from lorabench.config import option
from lorabench.methods.lora import LoRA
from lorabench.methods.lora.config import LoraConfig


@dataclass
class LoraEnsembleConfig(LoraConfig):
    members: int = option(3, "M: LoRA adapters trained from different seeds (initialisation and data order) whose "
                             "predictive distributions are averaged", low=2, high=64)


def member_seed(seed: int, member: int) -> int:
    """The seed of member m of the ensemble of trial seed `seed`: distinct for every (seed, member) up to 1000
    members; member 0's is the trial seed itself (so member 0 is the `lora` of the same seed)."""
    return seed + 1000 * member


def member_probabilities(option_scores: list[list[float]]) -> list[torch.Tensor]:
    """p_m(y | x) of one member: per question, the softmax over its options of their log-likelihoods."""
    return [torch.softmax(torch.tensor(sc, dtype=torch.float64), dim=0) for sc in option_scores]


def ensemble(members: list[list[list[float]]], labels: list[int]) -> dict:
    """The ensemble of M members' option log-likelihoods (members[m][question][option]) against the labels:
    its predictions, accuracy and mean negative log-likelihood of the correct option, each member's, and the
    members' disagreement (the mean over member pairs of the fraction of questions they answer differently)."""
    if len(members) < 1:
        raise ValueError("an ensemble needs at least one member's scores")
    n = len(labels)
    if any(len(m) != n for m in members):
        raise ValueError(f"every member must score the {n} questions; got {[len(m) for m in members]}")
    probs = [member_probabilities(m) for m in members]                               # [M][Q] (options,)
    p_ens = [sum(p[q] for p in probs) / len(probs) for q in range(n)]                # (1/M) Σ_m p_m(y | x)
    pred = [int(p.argmax()) for p in p_ens]
    member_pred = [[int(p[q].argmax()) for q in range(n)] for p in probs]

    def nll(ps: list[torch.Tensor]) -> float:
        return float(sum(-math.log(max(float(p[y]), 1e-300)) for p, y in zip(ps, labels)) / n)
    pairs = list(itertools.combinations(range(len(members)), 2))
    disagreement = (sum(sum(a != b for a, b in zip(member_pred[i], member_pred[j])) / n for i, j in pairs) / len(pairs)
                    if pairs else 0.0)
    return {
        "pred": pred,
        "correct": [int(p == y) for p, y in zip(pred, labels)],
        "accuracy": sum(p == y for p, y in zip(pred, labels)) / n,
        "nll": nll(p_ens),
        "member_accuracy": [sum(p == y for p, y in zip(mp, labels)) / n for mp in member_pred],
        "member_nll": [nll(p) for p in probs],
        "disagreement": disagreement,
        # questions on which not every member gives the same answer
        "any_disagreement": sum(len({mp[q] for mp in member_pred}) > 1 for q in range(n)) / n,
    }


class LoraEnsemble(LoRA):
    __doc__ = __doc__
    name = "lora-ensemble"
    title = "LoRA ensembles for large language model fine-tuning"
    paper = "2310.00035"
    family = "cross-task"
    config_cls = LoraEnsembleConfig
