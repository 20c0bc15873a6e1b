"""AFLoRA: Adaptive Freezing of Low Rank Adaptation (Liu et al., arXiv 2403.13269).

The update is ΔW = s diag(b) B diag(d) A (eq. (1)): trainable projections A (r, k) and B (d, r)
(both kaiming-initialised) and feature-transformation vectors d (r, ones) and b (d_out, zeros,
so ΔW = 0 at init). Vectors stay trainable; the projections are frozen one by one while
training. Each projection's freezing score (eqs. (2)-(4), AdaLoRA's sensitivity smoothing) is
s = mean(Ī ⊙ Ū) with I = |θ ⊙ ∇θ|, Ī_t = β1 Ī + (1 - β1) I, Ū_t = β2 Ū + (1 - β2) |I - Ī|; the
number of frozen projections follows a cubic schedule (eq. (5)): none before t_i, all after
T - t_f, and 1 - (1 - (t - t_i) / (T - t_i - t_f))^3 of them in between, lowest scores first.
The record carries the final frozen fraction and the trainable parameters left at the end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.lora import LoRA, LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant


class AfloraVariant(LoraVariant):
    def init(self, layer: LoraLinear) -> None:
        nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))
        like = layer.lora_A
        layer.lora_d = nn.Parameter(torch.ones(layer.rank, dtype=like.dtype, device=like.device))
        layer.lora_b = nn.Parameter(torch.zeros(layer.out_features, dtype=like.dtype, device=like.device))

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return layer.scale * (layer.lora_b[:, None] * layer.lora_B) @ (layer.lora_d[:, None] * layer.lora_A)  # eq. (1)

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        h = (x @ layer.lora_A.T) * layer.lora_d        # (..., r)
        h = (h @ layer.lora_B.T) * layer.lora_b        # (..., d)
        return layer.base(x) + h * layer.scale


def frozen_fraction(step: int, total: int, t_i: int, t_f: int) -> float:
    """Cubic schedule (eq. (5)): the fraction of projections frozen after `step` steps."""
    if step < t_i:
        return 0.0
    span = total - t_i - t_f
    if step >= total - t_f or span <= 0:
        return 1.0
    return 1.0 - (1.0 - (step - t_i) / span) ** 3


@dataclass
class AfloraConfig(LoraConfig):
    warmup_ratio: float = option(0.1, "t_i / T: steps before any projection is frozen", low=0.0, high=1.0)
    final_ratio: float = option(0.3, "t_f / T: the last steps, in which every projection is frozen", low=0.0, high=1.0)
    beta1: float = option(0.85, "EMA factor of the sensitivity I (eq. (3))", low=0.0, high=1.0)
    beta2: float = option(0.85, "EMA factor of its uncertainty U (eq. (4))", low=0.0, high=1.0)

    def __post_init__(self):
        super().__post_init__()
        if self.warmup_ratio + self.final_ratio > 1:
            raise ValueError(f"warmup_ratio + final_ratio must be <= 1, got {self.warmup_ratio + self.final_ratio}")
        if self.dropout > 0 or self.kernel == "fused":
            raise ValueError("aflora has its own forward: use dropout=0 and kernel='reference'")


class AFLoRA(LoRA):
    name = "aflora"
    title = "AFLoRA: Adaptive Freezing of Low Rank Adaptation in Parameter Efficient Fine-Tuning"
    paper = "2403.13269"
    family = "efficiency-freezing-sharing"
    config_cls = AfloraConfig
    mechanism_metrics = {
        "frozen_projection_fraction": "fraction of the trainable projections frozen by their freezing score",
        "trainable_params_at_end": "adapter and head parameters still trained at the end",
    }

    def variant(self) -> LoraVariant:
        return AfloraVariant()

    def projections(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for m in self.lora_layers(model) for p in (m.lora_A, m.lora_B)]

    def on_train_begin(self, state: TrainState) -> None:
        self.ibar: dict[nn.Parameter, torch.Tensor] = {}
        self.ubar: dict[nn.Parameter, torch.Tensor] = {}
        self.score: dict[nn.Parameter, float] = {}

    @torch.no_grad()
    def on_after_backward(self, state: TrainState) -> None:
        c = self.config
        for p in self.projections(state.model):
            if not p.requires_grad or p.grad is None:
                continue
            i = (p * p.grad).abs()                                             # eq. (2)
            ib = self.ibar.get(p, torch.zeros_like(p))
            ub = self.ubar.get(p, torch.zeros_like(p))
            ib = c.beta1 * ib + (1 - c.beta1) * i                              # eq. (3)
            ub = c.beta2 * ub + (1 - c.beta2) * (i - ib).abs()                 # eq. (4)
            self.ibar[p], self.ubar[p] = ib, ub
            self.score[p] = float((ib * ub).mean())

    def on_step_end(self, state: TrainState) -> None:
        c = self.config
        proj = self.projections(state.model)
        t_i = int(round(c.warmup_ratio * state.total_steps))
        t_f = int(round(c.final_ratio * state.total_steps))
        target = int(math.floor(frozen_fraction(state.step + 1, state.total_steps, t_i, t_f) * len(proj)))
        active = [p for p in proj if p.requires_grad]
        n_freeze = target - (len(proj) - len(active))
        for p in sorted(active, key=lambda q: self.score.get(q, 0.0))[:max(0, n_freeze)]:
            p.requires_grad_(False)   # frozen for good: no gradient, no optimizer update
            p.grad = None
            self.ibar.pop(p, None), self.ubar.pop(p, None)

    def on_train_end(self, state: TrainState) -> None:
        proj = self.projections(state.model)
        state.metrics["frozen_projection_fraction"] = round(sum(not p.requires_grad for p in proj) / max(1, len(proj)), 4)
        state.metrics["trainable_params_at_end"] = sum(p.numel() for _, p in self.trainable_parameters(state.model))
