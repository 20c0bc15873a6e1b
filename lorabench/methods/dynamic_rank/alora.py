"""ALoRA: Allocating Low-Rank Adaptation for fine-tuning large language models
(Liu, Lyn, Zhu, Tian, Graham, arXiv 2403.16187).

Every layer starts with the same number of rank-1 components, each behind a gate g_j (= 1 or 0):
ΔW = s B diag(g) A. At intervals, the importance of every active component is estimated by
ablation (AB-LoRA, sec. 3.2): how much the loss rises when the component is switched off. The
least important components of the whole model are pruned and the same number of components is
given to the layers with the most important ones (sec. 3.3), so the total rank budget stays the
same while it moves to where it matters. New components start with B's column at zero (the
function does not jump) and a fresh A row.

Ablating each component with a separate forward pass costs one pass per component; on a CPU
budget we use the first-order estimate of the same ablation, L(g_j = 0) - L ≈ -∂L/∂g_j
(a Taylor step from g_j = 1 to 0), accumulated over the steps between two reallocations.
Components are pre-allocated up to `max_rank` per layer so the optimizer's tensors never change.
The record carries the final rank distribution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState, interval_in_budget
from lorabench.methods.lora import LoRA, LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant


class AblationGateVariant(LoraVariant):
    """lora_A (R, k), lora_B (d, R), gates `rank_gate` (R, 0/1, a leaf tensor that collects ∂L/∂g)."""

    def __init__(self, init_rank: int):
        self.init_rank = init_rank

    def init(self, layer: LoraLinear) -> None:
        g = torch.zeros(layer.rank, dtype=layer.lora_A.dtype, device=layer.lora_A.device)
        g[: self.init_rank] = 1
        layer.register_buffer("rank_gate", g)

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return layer.scale * (layer.lora_B * layer.rank_gate) @ layer.lora_A

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
        gate = layer.rank_gate
        if layer.training and torch.is_grad_enabled():
            gate = gate.detach().requires_grad_(True)   # a leaf: its gradient is ∂L/∂g
            layer.gate_leaf = gate
        return layer.base(x) + ((h @ layer.lora_A.T) * gate) @ layer.lora_B.T * layer.scale


@dataclass
class ALoraConfig(LoraConfig):
    rank: int = option(12, "max_rank R: components pre-allocated per layer (the most a layer can hold)",
                       low=1, high=4096)
    init_rank: int = option(8, "active components per layer at the start (the budget is init_rank x layers)", low=1)
    realloc_every: int | None = option(
        None, "steps between two reallocations; None = a fifth of the steps before the final phase (four "
              "reallocations at any budget); must fit in those steps", low=1)
    realloc_fraction: float = option(0.1, "fraction of the active components pruned and re-given per reallocation",
                                     low=0.0, high=1.0)
    final_ratio: float = option(0.2, "fraction of the last steps without reallocation", low=0.0, high=1.0)

    def __post_init__(self):
        super().__post_init__()
        if self.init_rank > self.rank:
            raise ValueError(f"init_rank ({self.init_rank}) must not exceed rank, the max_rank ({self.rank})")
        if self.kernel == "fused":
            raise ValueError("alora has its own gated forward: use kernel='reference'")


class ALoRA(LoRA):
    name = "alora"
    title = "ALoRA: Allocating Low-Rank Adaptation for Fine-tuning Large Language Models"
    paper = "2403.16187"
    family = "dynamic-rank"
    config_cls = ALoraConfig
    mechanism_metrics = {
        "rank_mean": "mean number of active components per layer at the end (the budget is init_rank)",
        "rank_min": "fewest active components of a layer at the end",
        "rank_max": "most active components of a layer at the end",
        "reallocations": "reallocation rounds done (prune by ablation score, re-give to important layers)",
        "components_moved": "components pruned and re-given over the run",
    }

    def variant(self) -> LoraVariant:
        return AblationGateVariant(self.config.init_rank)

    def on_train_begin(self, state: TrainState) -> None:
        self.ablation = {id(m): torch.zeros(m.rank) for m in self.lora_layers(state.model)}
        self.stop = int(round((1 - self.config.final_ratio) * state.total_steps))
        self.every = interval_in_budget(self.config.realloc_every, 0.2, self.stop, "realloc_every")
        self.reallocations, self.moved = 0, 0

    @torch.no_grad()
    def on_after_backward(self, state: TrainState) -> None:
        for m in self.lora_layers(state.model):
            leaf = getattr(m, "gate_leaf", None)
            if leaf is not None and leaf.grad is not None:
                self.ablation[id(m)] += -leaf.grad.float().cpu()   # L(g_j=0) - L ≈ -∂L/∂g_j
            m.gate_leaf = None

    def on_step_end(self, state: TrainState) -> None:
        done = state.step + 1
        if done % self.every == 0 and done <= self.stop:
            self.moved += self.reallocate(state.model)
            self.reallocations += 1

    @torch.no_grad()
    def reallocate(self, model: nn.Module) -> int:
        """Prune the least important active components; give as many new ones to the most important layers."""
        layers = self.lora_layers(model)
        active = [(float(self.ablation[id(m)][j]), i, j) for i, m in enumerate(layers)
                  for j in range(m.rank) if m.rank_gate[j] > 0]
        n = int(self.config.realloc_fraction * len(active))
        if n == 0:
            return 0
        active.sort()
        for _, i, j in active[:n]:
            m = layers[i]
            m.rank_gate[j] = 0
            m.lora_B[:, j] = 0          # a pruned component leaves nothing behind
        # layer importance: the mean ablation score of its (remaining) active components
        def layer_score(m):
            on = m.rank_gate > 0
            return float(self.ablation[id(m)][on].mean()) if on.any() else -math.inf
        order = sorted(layers, key=layer_score, reverse=True)
        given = 0
        while given < n:   # rounds of one new component per layer, most important layers first
            progressed = False
            for m in order:
                free = (m.rank_gate == 0).nonzero()
                if given >= n or len(free) == 0:
                    continue
                j = int(free[0])
                nn.init.kaiming_uniform_(m.lora_A[j:j + 1], a=math.sqrt(5))
                m.lora_B[:, j] = 0       # B's column at zero: the new component starts as a no-op
                m.rank_gate[j] = 1
                given += 1
                progressed = True
            if not progressed:
                break
        for m in layers:
            self.ablation[id(m)].zero_()
        return n

    def on_train_end(self, state: TrainState) -> None:
        ranks = [int(m.rank_gate.sum()) for m in self.lora_layers(state.model)]
        state.metrics["reallocations"], state.metrics["components_moved"] = self.reallocations, self.moved
        state.metrics["rank_mean"] = round(sum(ranks) / max(1, len(ranks)), 3)
        state.metrics["rank_min"], state.metrics["rank_max"] = min(ranks, default=0), max(ranks, default=0)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().adapter_state_dict(model)
        state.update({n: b.detach() for n, b in model.named_buffers() if n.endswith("rank_gate")})
        return state
