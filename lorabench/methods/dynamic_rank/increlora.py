"""IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning
(Zhang et al., arXiv 2308.12043).

Each layer's update is a sum of rank-1 components in AdaLoRA's SVD form,
ΔW = s Σ_j λ_j p_j q_jᵀ = s P diag(λ ⊙ m) Q (eq. (3)), and training starts with only `init_rank`
active components (mask m) per layer. Every `grow_every` steps, between the warm-up and the
final phase, the layers with the highest importance score gain one component each (sec. 3.2),
until the total budget of `target_rank` components per layer on average is spent. A layer's
score is the mean of the smoothed sensitivity Ī ⊙ Ū of its parameters (eqs. (4)-(6), as AdaLoRA:
I = |θ ⊙ ∇θ|, Ī_t = β1 Ī + (1 - β1) I, Ū_t = β2 Ū + (1 - β2) |I - Ī|). A new component starts with
λ = 0 (the function does not jump) and random p, q. Components are pre-allocated up to
`max_rank` so the optimizer's parameters never change; masked components get no gradient.
The record carries the final rank distribution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.lora import LoRA, LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant, init_matrix


class IncrementalVariant(LoraVariant):
    """P = lora_B (d, R), Q = lora_A (R, k), λ = lora_E (R), active mask `rank_mask` (R)."""

    def __init__(self, init_rank: int):
        self.init_rank = init_rank

    def init(self, layer: LoraLinear) -> None:
        like = layer.lora_A
        init_matrix(layer.lora_B, "kaiming", layer.rank)
        layer.lora_E = nn.Parameter(torch.zeros(layer.rank, dtype=like.dtype, device=like.device))
        mask = torch.zeros(layer.rank, dtype=like.dtype, device=like.device)
        mask[: self.init_rank] = 1
        layer.register_buffer("rank_mask", mask)

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return layer.scale * (layer.lora_B * (layer.lora_E * layer.rank_mask)) @ layer.lora_A

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
        return layer.base(x) + ((h @ layer.lora_A.T) * (layer.lora_E * layer.rank_mask)) @ layer.lora_B.T * layer.scale


@dataclass
class IncreLoraConfig(LoraConfig):
    rank: int = option(16, "max_rank R: components pre-allocated per layer (the most a layer can grow to)",
                       low=1, high=4096)
    init_rank: int = option(2, "components active in every layer at the start", low=1)
    target_rank: float = option(8.0, "average active components per layer at the end (the parameter budget)", low=1.0)
    grow_every: int | None = option(
        None, "steps between two growth events; None = the growth window divided by the events needed to "
              "reach target_rank (a layer gains at most one component per event), so the budget is spent at "
              "any trial length", low=1)
    warmup_ratio: float = option(0.1, "fraction of steps before the first growth", low=0.0, high=1.0)
    final_ratio: float = option(0.2, "fraction of steps at the end without growth", low=0.0, high=1.0)
    beta1: float = option(0.85, "EMA factor of the sensitivity", low=0.0, high=1.0)
    beta2: float = option(0.85, "EMA factor of its uncertainty", low=0.0, high=1.0)

    def __post_init__(self):
        super().__post_init__()
        if not self.init_rank <= self.target_rank <= self.rank:
            raise ValueError(f"need init_rank <= target_rank <= rank (max_rank), got {self.init_rank}, "
                             f"{self.target_rank}, {self.rank}")
        if self.warmup_ratio + self.final_ratio >= 1:
            raise ValueError("warmup_ratio + final_ratio must be < 1")
        if self.kernel == "fused":
            raise ValueError("increlora has its own SVD-form forward: use kernel='reference'")


class IncreLoRA(LoRA):
    name = "increlora"
    title = "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning"
    paper = "2308.12043"
    family = "dynamic-rank"
    config_cls = IncreLoraConfig
    mechanism_metrics = {
        "ranks_added": "components activated during training, over all layers (the budget spent)",
        "growth_events": "growth events done",
        "rank_mean": "mean active components per layer at the end (init_rank at the start)",
        "rank_min": "fewest active components of a layer at the end",
        "rank_max": "most active components of a layer at the end",
    }

    def variant(self) -> LoraVariant:
        return IncrementalVariant(self.config.init_rank)

    def on_train_begin(self, state: TrainState) -> None:
        c = self.config
        layers = self.lora_layers(state.model)
        start = int(round(c.warmup_ratio * state.total_steps))
        stop = int(round((1 - c.final_ratio) * state.total_steps))
        # a layer gains at most one component per event: reaching the average target needs this many events
        needed = max(1, math.ceil(c.target_rank - c.init_rank))
        every = c.grow_every if c.grow_every is not None else max(1, (stop - start) // needed)
        self.events = [t for t in range(start + every, stop + 1, every)] or [max(1, start)]
        if len(self.events) < needed:
            raise ValueError(f"increlora: {len(self.events)} growth events (every {every} steps between steps "
                             f"{start} and {stop}) cannot grow init_rank={c.init_rank} to target_rank="
                             f"{c.target_rank}, which needs {needed}; lower grow_every, leave it None, or train longer")
        budget = int(round((c.target_rank - c.init_rank) * len(layers)))
        # spread the budget evenly over the growth events
        self.per_event = [budget // len(self.events) + (i < budget % len(self.events)) for i in range(len(self.events))]
        self.ibar, self.ubar = {}, {}
        self.score = {id(m): 0.0 for m in layers}
        self.added, self.n_events = 0, 0

    @torch.no_grad()
    def on_after_backward(self, state: TrainState) -> None:
        c = self.config
        for m in self.lora_layers(state.model):
            scores = []
            for p in (m.lora_A, m.lora_B, m.lora_E):
                if p.grad is None:
                    continue
                i = (p * p.grad).abs()
                ib = c.beta1 * self.ibar.get(p, torch.zeros_like(p)) + (1 - c.beta1) * i
                ub = c.beta2 * self.ubar.get(p, torch.zeros_like(p)) + (1 - c.beta2) * (i - ib).abs()
                self.ibar[p], self.ubar[p] = ib, ub
                scores.append((ib * ub).mean())
            if scores:
                self.score[id(m)] = float(torch.stack(scores).mean())

    @torch.no_grad()
    def on_step_end(self, state: TrainState) -> None:
        done = state.step + 1
        if done in self.events:
            self.added += len(self.grow(state.model, self.per_event[self.events.index(done)]))
            self.n_events += 1

    @torch.no_grad()
    def grow(self, model: nn.Module, n: int) -> list[LoraLinear]:
        """Add one component to each of the n highest-scoring layers that still have room."""
        room = [m for m in self.lora_layers(model) if int(m.rank_mask.sum()) < m.rank]
        chosen = sorted(room, key=lambda m: self.score.get(id(m), 0.0), reverse=True)[:n]
        for m in chosen:
            j = int(m.rank_mask.sum())
            m.rank_mask[j] = 1        # component j becomes active with λ_j = 0: ΔW is unchanged
            m.lora_E[j] = 0
        return chosen

    def on_train_end(self, state: TrainState) -> None:
        ranks = [int(m.rank_mask.sum()) for m in self.lora_layers(state.model)]
        state.metrics["rank_mean"] = round(sum(ranks) / max(1, len(ranks)), 3)
        state.metrics["rank_min"], state.metrics["rank_max"] = min(ranks, default=0), max(ranks, default=0)
        state.metrics["ranks_added"], state.metrics["growth_events"] = self.added, self.n_events

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().adapter_state_dict(model)
        state.update({n: b.detach() for n, b in model.named_buffers() if n.endswith("rank_mask")})
        return state
