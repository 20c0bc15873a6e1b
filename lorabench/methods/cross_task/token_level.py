"""Token-level adaptation of LoRA adapters (Belofsky, "Token-Level Adaptation of LoRA Adapters for Downstream Task
Generalization", arXiv 2311.10847): a gradient-free router that re-weights the library's adapters at every token
from the similarity of the text so far to each adapter's domain.

Each adapter i has a domain centroid c_i, the mean sentence embedding of its task's training examples. Before each
token is predicted, the text so far x_≤t (the prompt and the tokens after it) is embedded, E(x_≤t), and

    s_i = cos(E(x_≤t), c_i),  s_max ← τ · s_max (τ = 4: the largest similarity sharpened),  w = softmax(s)   (sec. 3)

and the adapters are combined with the weights w into one adapter, which predicts the next token (the paper's code,
github.com/jb-01/LoRA-TLE, moe.py: all-MiniLM-L6-v2 embeddings, temperature 4.0 on the maximum, peft's
`add_weighted_adapter(..., combination_type="linear")` at every generated token). `combination` chooses how:
`linear` is that peft merge, factor-wise with weights sqrt(w_i s) on A_i and on B_i (so cross terms B_i A_j stay;
lorabench/methods/cross_task/merging.py), `exact` the weighted sum of the updates Σ_i w_i s B_i A_i.

In the leave-one-task-out protocol (lorabench/harness/cross_task.py) the held-out task's multiple-choice options are
scored token by token: the log-likelihood of option token o_k is read after the prompt and o_<k have gone through the
model under the weights of that text, w(prompt ⊕ o_<k): every option's first token under the prompt's weights, the
next ones under weights that follow the option's own tokens. The embedder is `minilm-l6` (the paper's); each
centroid is the mean embedding of `adapter_examples` training prompts of the adapter's task. No k-shot example is read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorabench.config import option
from lorabench.methods.cross_task.base import Composition, CompositionMethod, LossFn, State, factorwise
from lorabench.methods.cross_task.uniform_average import concatenated
from lorabench.methods.lora.config import LoraConfig

COMBINATIONS = ("linear", "exact")


@dataclass
class TokenLevelConfig(LoraConfig):
    temperature: float = option(4.0, "the largest similarity is multiplied by this before the softmax (the paper's "
                                     "code: 4.0)", low=0.0)
    combination: str = option("linear", "how the weighted adapters are combined: linear (peft's factor-wise "
                                        "add_weighted_adapter, as the paper's code) or exact (Σ w_i s B_i A_i)")
    adapter_examples: int = option(32, "training examples of each adapter's task whose mean embedding is its domain "
                                       "centroid (the paper's code: the whole training set)", low=1, high=100000)
    embedder: str = option("minilm-l6", "sentence encoder of the text so far and of the centroids (the paper's: "
                                        "all-MiniLM-L6-v2)")

    def __post_init__(self):
        super().__post_init__()
        if self.combination not in COMBINATIONS:
            raise ValueError(f"combination {self.combination!r} is not one of {', '.join(COMBINATIONS)}")


def token_weights(similarity: torch.Tensor, temperature: float) -> torch.Tensor:
    """(P, N) cosine similarities of P texts to N centroids -> (P, N) weights: the largest similarity of each row
    multiplied by the temperature, then a softmax over the adapters (sec. 3; moe.py's `similarity`)."""
    s = similarity.clone().float()
    rows = torch.arange(s.shape[0])
    top = s.argmax(dim=1)
    s[rows, top] = s[rows, top] * temperature
    return torch.softmax(s, dim=1)


class TokenLevel(CompositionMethod):
    __doc__ = __doc__
    name = "token-level"
    title = "Token-level adaptation of LoRA adapters for downstream task generalization"
    paper = "2311.10847"
    config_cls = TokenLevelConfig
    token_level = True   # the harness scores the held-out task token by token (cross_task.token_level_evaluate)

    def combine(self, states: list[State], weights: list[float], scale: float) -> State:
        """The one adapter of weights w: peft's `linear` (Σ sqrt(w_i s) B_i)(Σ sqrt(w_i s) A_i), or Σ w_i s B_i A_i."""
        if self.config.combination == "linear":
            return factorwise(states, [max(w, 0.0) ** 0.5 for w in weights], scale)   # s (Σ√w B)(Σ√w A)
        return concatenated(states, weights, scale)

    def compose(self, states: list[State], scale: float, loss_fn: LossFn, seed: int) -> Composition:
        raise ValueError("token-level re-weights the adapters at every token: the cross-task protocol scores the "
                         "held-out task token by token (lorabench/harness/cross_task.py, token_level_evaluate)")
