"""LoRAHub (Huang et al., "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition",
arXiv 2307.13269): weights w over N library adapters, found without gradients on the k-shot loss.

COMPOSE (sec. 3): the composed adapter is (Σ w_i A_i, Σ w_i B_i) (`base.factorwise`).
ADAPT (sec. 3): w minimises L(w) + α Σ|w_i| over the k shots, by a gradient-free optimiser (the paper and
its code use nevergrad's NGOpt recommender, w started at 0 and bounded to [-1.5, 1.5], 40 evaluations,
and the L1 term 0.05 · mean|w_i|).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorabench.config import option
from lorabench.methods.cross_task.base import Composition, CompositionMethod, LossFn, State, factorwise
from lorabench.methods.lora.config import LoraConfig


@dataclass
class LoraHubConfig(LoraConfig):
    budget: int = option(40, "loss evaluations the gradient-free optimiser may make (LoRAHub's max_inference_step)",
                         low=1, high=10000)
    bound: float = option(1.5, "each weight stays in [-bound, bound] (LoRAHub's code: 1.5)", low=0.0)
    l1: float = option(0.05, "weight of the L1 term: l1 · mean|w_i| is added to the k-shot loss (LoRAHub's code)",
                       low=0.0)
    optimizer: str = option("NGOpt", "nevergrad optimiser name (ng.optimizers.registry); LoRAHub uses NGOpt")

    def __post_init__(self):
        super().__post_init__()
        if self.bound == 0:
            raise ValueError("bound=0 allows only w = 0 (no adapter); use a positive bound such as 1.5")


class LoraHub(CompositionMethod):
    __doc__ = __doc__
    name = "lorahub"
    title = "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition"
    paper = "2307.13269"
    config_cls = LoraHubConfig

    def objective(self, w: np.ndarray, states: list[State], scale: float, loss_fn: LossFn) -> float:
        # ADAPT (sec. 3): the k-shot loss of the composed adapter plus the L1 term on the weights
        return float(loss_fn(factorwise(states, w.tolist(), scale))) + self.config.l1 * float(np.abs(w).mean())

    def compose(self, states: list[State], scale: float, loss_fn: LossFn, seed: int) -> Composition:
        import nevergrad as ng
        c, n = self.config, len(states)
        if c.optimizer not in ng.optimizers.registry:
            raise ValueError(f"unknown nevergrad optimiser {c.optimizer!r}; e.g. NGOpt, CMA, OnePlusOne, "
                             f"TwoPointsDE (ng.optimizers.registry lists all)")
        param = ng.p.Array(init=np.zeros(n), lower=-c.bound, upper=c.bound)   # w starts at 0, as LoRAHub
        param.random_state = np.random.RandomState(seed)
        opt = ng.optimizers.registry[c.optimizer](parametrization=param, budget=c.budget)
        seen: dict[tuple, float] = {}
        calls = [0]

        def f(w):
            calls[0] += 1
            seen[tuple(float(x) for x in w)] = value = self.objective(w, states, scale, loss_fn)
            return value
        best = opt.minimize(f)
        w = [float(x) for x in best.value]
        objective = seen.get(tuple(w))   # the recommendation is normally an evaluated point; not re-scored
        return Composition(factorwise(states, w, scale), w, calls[0],
                           {"optimizer": c.optimizer, "budget": c.budget,
                            "objective": None if objective is None else round(objective, 6)})
