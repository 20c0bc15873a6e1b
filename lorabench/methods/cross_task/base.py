"""What a composition method is: a LoRA method plus a rule that turns N library adapters into one.

A composition method *is* a `LoRA` subclass: a single-task trial of it trains one LoRA adapter, the kind
the library holds (lorabench/harness/multitask.py). The multi-task scenario (lorabench/harness/cross_task.py)
drives the rule: `compose(states, scale, loss_fn, seed)` receives the library's adapters of a held-out
task's candidates (each `{layer}.lora_A: (r, in)`, `{layer}.lora_B: (out, r)`, all at one scale s =
alpha / r) and a `loss_fn(state) -> float` that scores a composed adapter on the held-out task's k shots,
and returns a `Composition`: the composed adapter with its scale folded into B (apply it at scale 1), the
weights it chose, and how many times it called `loss_fn`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from lorabench.methods.lora import LoRA

State = dict[str, torch.Tensor]
LossFn = Callable[[State], float]


def layer_prefixes(state: State) -> list[str]:
    """The adapted layers of a state: every prefix that has both `.lora_A` and `.lora_B`."""
    a = {k[: -len(".lora_A")] for k in state if k.endswith(".lora_A")}
    return sorted(p for p in a if f"{p}.lora_B" in state)


def check_library(states: list[State]) -> list[str]:
    """The layers every adapter of the library adapts; a clear error when they do not fit together."""
    if not states:
        raise ValueError("composition needs at least one library adapter, got none")
    layers = layer_prefixes(states[0])
    for i, s in enumerate(states[1:], 1):
        if layer_prefixes(s) != layers:
            raise ValueError(f"library adapter {i} adapts other layers than adapter 0; compose adapters trained "
                             f"with the same target_modules")
        for p in layers:
            if s[f"{p}.lora_A"].shape != states[0][f"{p}.lora_A"].shape:
                raise ValueError(f"library adapter {i} has {p}.lora_A of shape {tuple(s[f'{p}.lora_A'].shape)}, "
                                 f"adapter 0 {tuple(states[0][f'{p}.lora_A'].shape)}; factor-wise composition "
                                 f"needs one rank")
    return layers


def factorwise(states: list[State], weights: list[float], scale: float) -> State:
    """LoRAHub's COMPOSE step (arXiv 2307.13269, sec. 3): Â = Σ_i w_i A_i, B̂ = Σ_i w_i B_i, the composed
    update s B̂ Â; s folded into B̂. Not Σ_i w_i B_i A_i: the cross terms w_i w_j B_i A_j stay (PEFT's
    `linear` merge does the same, with sqrt weights)."""
    out = {}
    for p in check_library(states):
        out[f"{p}.lora_A"] = sum(w * s[f"{p}.lora_A"].float() for w, s in zip(weights, states))       # (r, in)
        out[f"{p}.lora_B"] = scale * sum(w * s[f"{p}.lora_B"].float() for w, s in zip(weights, states))  # (out, r)
    return out


def delta_weights(state: State, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The dense update ΔW = s B A (out, in) of each layer of a state."""
    return {p: scale * state[f"{p}.lora_B"].float() @ state[f"{p}.lora_A"].float() for p in layer_prefixes(state)}


@dataclass
class Composition:
    state: State                                   # the composed adapter, scale folded into B (apply at scale 1)
    weights: list[float]                           # the weight of each library adapter
    loss_evaluations: int = 0                      # calls of loss_fn (k-shot forward passes) the rule made
    info: dict = field(default_factory=dict)       # rule-specific facts, into the record


class CompositionMethod(LoRA):
    """Base of the cross-task family's composition rules."""

    family = "cross-task"
    input_aware = False   # True: the rule composes per eval input (LoraRetriever), through compose_retrieved
    token_level = False   # True: the rule re-weights per token (token-level adaptation), through combine

    def compose(self, states: list[State], scale: float, loss_fn: LossFn, seed: int) -> Composition:
        raise NotImplementedError
