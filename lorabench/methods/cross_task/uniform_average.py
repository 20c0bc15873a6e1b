"""Uniform averaging of the library's adapters in weight space, the composition baseline of the issue: the
"uniform soup" of Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time" (arXiv 2203.05482, eq. of the uniform soup: θ = (1/N) Σ_i θ_i),
applied to the adapters' updates: the exact mean update ΔW = (1/N) Σ_i s B_i A_i, held without loss as one adapter of rank N·r by concatenating
the factors (A = [A_1; ...; A_N], B = [s B_1, ..., s B_N] / N; PEFT's `cat` merge at equal weights). No
k-shot example is used."""
from __future__ import annotations

import torch

from lorabench.methods.cross_task.base import Composition, CompositionMethod, LossFn, State, check_library


def concatenated(states: list[State], weights: list[float], scale: float) -> State:
    """Σ_i w_i s B_i A_i exactly, as the rank-(Σ r_i) adapter ([A_1; ...; A_N], [w_1 s B_1, ..., w_N s B_N])."""
    out = {}
    for p in check_library(states):
        out[f"{p}.lora_A"] = torch.cat([s[f"{p}.lora_A"].float() for s in states], dim=0)                  # (N r, in)
        out[f"{p}.lora_B"] = torch.cat([w * scale * s[f"{p}.lora_B"].float() for w, s in zip(weights, states)],
                                       dim=1)                                                                # (out, N r)
    return out


class UniformAverage(CompositionMethod):
    __doc__ = __doc__
    name = "uniform-average"
    title = "Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing inference time (the uniform soup, of task adapters)"
    paper = "2203.05482"

    def compose(self, states: list[State], scale: float, loss_fn: LossFn, seed: int) -> Composition:
        w = [1.0 / len(states)] * len(states)
        return Composition(concatenated(states, w, scale), w, 0, {"rank": len(states) * self.config.rank})
