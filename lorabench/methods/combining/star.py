"""STAR: constraint LoRA with dynamic active learning for data-efficient fine-tuning
(Zhang, Wu, Zhou, Xu, ACL 2024, arXiv 2403.01165; authors' code github.com/callanwu/STAR).

STAR fine-tunes LoRA on examples it chooses to label from an unlabelled pool, under a labelling
budget, in active-learning rounds: infer on the pool, query the most uncertain examples, label
them, add them to the training set, train (the paper's fig. 4). Two fixes make uncertainty-based
acquisition work with LoRA:

- Dynamic uncertainty (the "uncertainty gap": early on, LoRA has barely moved the model, so the
  adapted model's uncertainty is uninformative). The acquisition score mixes the base model's
  and the adapted ("full") model's uncertainty,
      μ(x) = λ(t) μ_b(x) + (1 - λ(t)) μ_f(x),
  with λ(t) decreasing over the rounds t. As in the authors' code (`PE_dynamic_get_value`, full
  weight 0.1 (t + 1) over 10 iterations), λ(t) = 1 - t / R for the AL rounds t = 1 .. R-1 of R
  acquisitions (round 0 is the paper's random initial set). Both uncertainties are min-max
  normalised over the round's candidates before mixing (the code normalises them too).
- Calibration (LoRA becomes over-confident): a hybrid regularisation, an L2 constraint on the
  zero-initialised B as decoupled weight decay, B ← B - γ (g + β B) (AdamW with weight decay
  β on B only; 0.5 in the authors' code), and Monte-Carlo dropout on the random A path: μ_f is
  the predictive entropy H(p̄) of p̄ = mean over `mc_samples` passes with LoRA's input dropout
  on (the backbone's dropout off).

The uncertainty of an example is the entropy of the model's predictive distribution computed
from its inputs only (see active_pool.py: labels stay hidden until acquired).

lorabench adaptations (a fixed step budget, one training run): the R acquisitions happen at
evenly spaced steps of the one run (round t at step round(t T / R)); after each, training
continues on the whole labelled set (shuffled epochs) instead of re-training LoRA from scratch
as the paper does per iteration. Scoring a whole pool (7.5k-26k examples) every round is too slow
on CPU for the standard budget, so each round scores `candidates` unlabelled examples drawn at
random from the pool (by default 4 per label it acquires); the base model's uncertainty of an
example is computed once (the tensors trained by the method, snapshotted before step 0, are
swapped in) and cached. Scoring runs inside the batch iterator, before a step's timer starts:
it counts in train_seconds, not in the steps' tokens/s; `scoring_seconds` reports it.

The method needs a task with a train split it can draw examples from (every lorabench
classification, multiple-choice and generation task); the harness asks it for the batches
through `train_batches` instead of the task. Given a batch stream without a pool (the tester's
random task) it trains on that stream with the B constraint only, and says so in its metrics.
"""
from __future__ import annotations

import math
import random
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.lora import LoRA, LoraConfig
from lorabench.methods.combining.active_pool import entropy, pool_of, predictive_probs


# -- the paper's equations on plain tensors ---------------------------------------------------------

def dynamic_weight(t: int, rounds: int) -> float:
    """λ(t) = 1 - t / R: the base model's weight in AL round t (1 <= t < R), decreasing with t."""
    if not 1 <= t < rounds:
        raise ValueError(f"AL round {t} is outside 1..{rounds - 1} (round 0 is the random initial set)")
    return 1.0 - t / rounds


def minmax(u: torch.Tensor) -> torch.Tensor:
    """(u - min u) / (max u - min u) over the candidates; all zeros when every value is equal."""
    span = u.max() - u.min()
    return torch.zeros_like(u) if span <= 0 else (u - u.min()) / span


def dynamic_uncertainty(u_base: torch.Tensor, u_full: torch.Tensor, lam: float) -> torch.Tensor:
    """μ = λ(t) μ_b + (1 - λ(t)) μ_f, each min-max normalised over the candidates (STAR's dynamic
    uncertainty measurement)."""
    return lam * minmax(u_base) + (1.0 - lam) * minmax(u_full)


def mc_predictive_entropy(prob_samples: torch.Tensor) -> torch.Tensor:
    """MC-dropout predictive entropy H(p̄), p̄ = (1/S) Σ_s p_s, of (S, n, C) probabilities -> (n,)."""
    return entropy(prob_samples.mean(0))


def acquire_top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, highest first (ties: the earlier index)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].tolist()


def split_budget(budget: int, rounds: int) -> list[int]:
    """Labels acquired per round: the budget in equal parts (the paper adds the same number each
    iteration), the remainder to the earliest rounds."""
    return [budget // rounds + (1 if t < budget % rounds else 0) for t in range(rounds)]


def round_starts(total_steps: int, rounds: int) -> list[int]:
    """The step before which each acquisition round runs: evenly spaced, round 0 before step 0."""
    return [int(round(t * total_steps / rounds)) for t in range(rounds)]


# -- config and method ------------------------------------------------------------------------------

@dataclass
class StarConfig(LoraConfig):
    dropout: float = option(0.1, "dropout probability on the input of the low-rank path (A); also the "
                                 "Monte-Carlo dropout of the uncertainty estimate (0.1 in the authors' code)",
                            low=0.0, high=0.99)
    label_budget: float | None = option(
        None, "labels that may be acquired from the pool in total: a fraction of the pool if below 1, a count "
              "if 1 or more; None = half the example visits of the training budget (steps x batch_size / 2, "
              "so each labelled example is trained on about twice), at most the pool", low=0.0)
    rounds: int = option(3, "acquisition rounds R, evenly spaced over the steps: round 0 labels a random "
                            "initial set (the paper's cold start), rounds 1..R-1 the examples of highest "
                            "dynamic uncertainty; the budget is split equally over the rounds", low=1, high=1000)
    candidates: int | None = option(
        None, "unlabelled examples drawn at random from the pool and scored per round; None = candidate_ratio "
              "x the labels the round acquires (at most the remaining pool)", low=1)
    candidate_ratio: float = option(4.0, "with candidates=None, the round scores this many candidates per label "
                                         "it acquires (the paper scores the whole pool: set candidates to the "
                                         "pool size for that, slow on CPU for pools of thousands)", low=1.0)
    mc_samples: int = option(3, "Monte-Carlo dropout passes per candidate for the adapted model's uncertainty "
                                "(3 in the authors' code)", low=1, high=64)
    b_weight_decay: float = option(0.5, "β of the L2 constraint on B, as decoupled weight decay "
                                        "B <- B - lr (g + β B) (0.5 in the authors' code); A and the task head "
                                        "keep the training weight_decay", low=0.0)
    score_batch_size: int = option(32, "examples per forward pass while scoring candidates", low=1)

    def __post_init__(self):
        super().__post_init__()
        b = self.label_budget
        if b is not None:
            if b <= 0:
                raise ValueError(f"label_budget={b}: use a fraction of the pool in (0, 1) or a count >= 1")
            if b >= 1 and not float(b).is_integer():
                raise ValueError(f"label_budget={b}: a budget of 1 or more is a count of labels; use a whole "
                                 f"number or a fraction below 1")
            if b >= 1 and b < self.rounds:
                raise ValueError(f"label_budget={int(b)} is smaller than rounds={self.rounds}: every round "
                                 f"labels at least one example")
        if self.mc_samples > 1 and self.dropout == 0:
            raise ValueError("mc_samples > 1 needs dropout > 0 (with dropout=0 every Monte-Carlo pass is the "
                             "same); set dropout, or mc_samples=1")
        if self.zero_init != "B":
            raise ValueError("star constrains the zero-initialised B and drops out on the random A path: "
                             "use zero_init='B'")


class STAR(LoRA):
    name = "star"
    title = ("STAR: Constraint LoRA with Dynamic Active Learning for Data-Efficient Fine-Tuning of Large "
             "Language Models")
    paper = "2403.01165"
    # The survey (arXiv 2407.11046) lists STAR with Laplace-LoRA under "combining with other learning
    # paradigms" (here: active learning), docs/survey-papers.tsv; laplace-lora uses the same family.
    family = "combining"
    config_cls = StarConfig
    mechanism_metrics = {
        "active_learning": "whether labels were acquired from a pool (False: the task exposes none)",
        "labels_used": "examples labelled (acquired) over the rounds",
        "rounds": "acquisition rounds run",
        "lambda_per_round": "the dynamic uncertainty weight λ of each round after the first",
    }
    # default_lr: LoRA's (5e-4); the paper's 1.5e-4 is for LLaMA-2 7B with rank 64.

    # -- calibration: the constraint on B ----------------------------------------------------------
    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        named = self.trainable_parameters(model)
        b = [p for n, p in named if n.endswith("lora_B")]
        rest = [p for n, p in named if not n.endswith("lora_B")]
        groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}] if rest else []
        if b:  # hybrid regularisation: B <- B - lr (g + β B), AdamW's decoupled decay on B only
            groups.append({"params": b, "lr": lr, "weight_decay": self.config.b_weight_decay})
        return groups

    # -- active learning: the harness takes its batches from here ----------------------------------
    def resolve_budget(self, n_pool: int, total_steps: int, batch_size: int) -> int:
        b, rounds = self.config.label_budget, self.config.rounds
        if b is None:
            return max(rounds, min(n_pool, math.ceil(total_steps * batch_size / 2)))
        count = max(1, round(b * n_pool)) if b < 1 else int(b)
        if count > n_pool:
            raise ValueError(f"label_budget={int(b)} exceeds the pool of {n_pool} training examples; use at "
                             f"most {n_pool}, or a fraction of the pool below 1")
        if count < rounds:
            raise ValueError(f"label_budget={b} gives {count} labels of a pool of {n_pool}, fewer than "
                             f"rounds={rounds}: raise the budget or lower rounds")
        return count

    def train_batches(self, state: TrainState, task, tokenizer, batch_size: int,
                      seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of acquired (labelled) examples; acquisition rounds run before their first step."""
        pool = pool_of(task)
        if pool is None:
            warnings.warn(f"task {getattr(task, 'name', task)!r} exposes no train split to acquire labels from: "
                          "star trains on its batches with the B constraint only (no active learning)")
            state.metrics["active_learning"] = False
            yield from task.train_batches(tokenizer, batch_size, seed)
            return
        c, rounds, total = self.config, self.config.rounds, state.total_steps
        if rounds > total:
            raise ValueError(f"rounds={rounds} acquisition rounds need at least {rounds} steps; this trial has "
                             f"{total}: lower rounds")
        budget = self.resolve_budget(len(pool), total, batch_size)
        per_round, starts = split_budget(budget, rounds), round_starts(total, rounds)
        rng = random.Random(seed)   # the acquisitions depend on the trial seed, not on the harness's RNG
        model = state.model
        named = dict(self.trainable_parameters(model))
        base = {n: p.detach().clone() for n, p in named.items()}   # the base model (B = 0, initial head)
        base_cache: dict[int, float] = {}
        remaining, labelled = list(range(len(pool))), []
        m = state.metrics
        m.update({"active_learning": True, "pool_size": len(pool), "label_budget": budget, "rounds": 0,
                  "labels_used": 0, "candidates_scored": 0, "scoring_seconds": 0.0, "lambda_per_round": [],
                  "acquired_uncertainty_mean": [], "candidate_uncertainty_mean": []})

        def acquire(t: int) -> None:
            nonlocal remaining
            k = min(per_round[t], len(remaining))
            if t == 0:
                chosen = rng.sample(remaining, k)    # the random initial labelled set (cold start)
            else:
                t0 = time.perf_counter()
                wanted = math.ceil(c.candidate_ratio * k) if c.candidates is None else c.candidates
                n = min(max(wanted, k), len(remaining))
                cand = rng.sample(remaining, n)
                u_full = self.uncertainty(task, model, tokenizer, [pool[i] for i in cand], c.mc_samples)
                todo = [i for i in cand if i not in base_cache]
                if todo:
                    with swapped(named, base):
                        u = self.uncertainty(task, model, tokenizer, [pool[i] for i in todo], 1)
                    base_cache.update(zip(todo, u.tolist()))
                u_base = torch.tensor([base_cache[i] for i in cand])
                lam = dynamic_weight(t, rounds)
                mu = dynamic_uncertainty(u_base, u_full, lam)              # μ = λ(t) μ_b + (1 - λ(t)) μ_f
                top = acquire_top(mu, k)                                   # query the most uncertain
                chosen = [cand[j] for j in top]
                m["candidates_scored"] += n
                m["scoring_seconds"] = round(m["scoring_seconds"] + time.perf_counter() - t0, 3)
                m["lambda_per_round"].append(round(lam, 4))
                m["acquired_uncertainty_mean"].append(round(float(mu[top].mean()), 4))
                m["candidate_uncertainty_mean"].append(round(float(mu.mean()), 4))
            taken = set(chosen)
            labelled.extend(chosen)
            remaining = [i for i in remaining if i not in taken]
            m["rounds"] = t + 1
            m["labels_used"] = len(labelled)
            m["labels_fraction"] = round(len(labelled) / len(pool), 6)

        step, t, order, pos = 0, 0, [], 0
        while True:
            if t < rounds and step == starts[t]:
                while t < rounds and step == starts[t]:   # rounds sharing a step run one after the other
                    acquire(t)
                    t += 1
                order, pos = [], 0                         # a new epoch over the enlarged labelled set
            if pos >= len(order) or (len(order) >= batch_size and pos + batch_size > len(order)):
                order, pos = labelled[:], 0
                rng.shuffle(order)
            chunk = order[pos:pos + batch_size]
            pos += batch_size
            yield task.collate([pool[i] for i in chunk], tokenizer)   # labels read only once acquired
            step += 1

    @torch.no_grad()
    def uncertainty(self, task, model: nn.Module, tokenizer, examples: list[dict], samples: int) -> torch.Tensor:
        """Predictive entropy H(p̄) of each example; with samples > 1, p̄ averages Monte-Carlo dropout
        passes (dropout on the low-rank path only; the backbone in eval mode)."""
        with scoring(model, self.lora_layers(model), mc=samples > 1):
            probs = torch.stack([predictive_probs(task, model, tokenizer, examples, self.config.score_batch_size)
                                 for _ in range(samples)])
        return mc_predictive_entropy(probs)


@contextmanager
def scoring(model: nn.Module, lora_layers: list[nn.Module], mc: bool):
    """Eval mode for scoring; with `mc`, LoRA layers stay in train mode so their dropout samples."""
    was_training = model.training
    model.eval()
    if mc:
        for layer in lora_layers:
            layer.train()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def swapped(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]):
    """Temporarily load `values` into `params` (the base model's tensors), then restore them."""
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(values[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
