"""SaLoRA: Structure-aware low-rank adaptation for parameter-efficient fine-tuning
(Hu, Xie, Wang, Chen, Pan; Mathematics 11(20):4317, 2023, doi:10.3390/math11204317; no arXiv id).

Each rank component j of each layer has a gate g_j in [0, 1]: ΔW = s B diag(g) A (sec. 3). The
gates are hard-concrete random variables (Louizos et al.'s L0 relaxation): with u ~ U(0, 1),
g = clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) (zeta - gamma) + gamma, 0, 1) while
training and the deterministic clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1) at
evaluation. The expected density d = mean_j P(g_j != 0) = mean sigmoid(log_alpha - beta
log(-gamma / zeta)) is held to the target density t by a Lagrangian
lambda1 (d - t) + lambda2 (d - t)^2 whose multipliers are trained by gradient ascent, and A and B
are kept near-orthogonal (||AAᵀ - I||²_F + ||BᵀB - I||²_F), so that the gated components stay
distinct. The record carries the evaluation-time rank (gates > 0) per layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState
from lorabench.methods.lora import LoRA, LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1  # hard-concrete temperature and stretch (Louizos et al. 2018)


def gates(log_alpha: torch.Tensor, training: bool) -> torch.Tensor:
    if training:
        u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / BETA)
    else:
        s = torch.sigmoid(log_alpha)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def expected_density(log_alpha: torch.Tensor) -> torch.Tensor:
    """Mean probability that a gate is non-zero: sigmoid(log_alpha - beta log(-gamma / zeta))."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA)).mean()


class GatedVariant(LoraVariant):
    def __init__(self, init_log_alpha: float):
        self.init_log_alpha = init_log_alpha

    def init(self, layer: LoraLinear) -> None:
        like = layer.lora_A
        layer.lora_gate = nn.Parameter(torch.full((layer.rank,), self.init_log_alpha, dtype=like.dtype,
                                                  device=like.device))   # log_alpha of each component

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return layer.scale * (layer.lora_B * gates(layer.lora_gate, False)) @ layer.lora_A

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
        g = gates(layer.lora_gate, layer.training)   # one gate sample per forward pass
        return layer.base(x) + ((h @ layer.lora_A.T) * g) @ layer.lora_B.T * layer.scale


@dataclass
class SaLoraConfig(LoraConfig):
    target_density: float = option(0.5, "target fraction t of rank components kept (the rank budget)", low=0.0, high=1.0)
    ortho_weight: float = option(0.1, "weight of the orthogonality regulariser on A and B", low=0.0)
    init_log_alpha: float = option(3.0, "initial log_alpha of every gate (3.0: gates start almost surely open)")

    def __post_init__(self):
        super().__post_init__()
        if self.kernel == "fused":
            raise ValueError("salora has its own gated forward: use kernel='reference'")


class SaLoRA(LoRA):
    name = "salora"
    title = "SaLoRA: Structure-Aware Low-Rank Adaptation for Parameter-Efficient Fine-Tuning"
    paper = "doi:10.3390/math11204317"   # Mathematics 2023; the paper has no arXiv id
    family = "dynamic-rank"
    config_cls = SaLoraConfig
    mechanism_metrics = {
        "rank_mean": "mean number of open gates per layer at the end",
        "expected_density": "expected fraction of open L0 gates at the end (the constraint's target_density)",
    }

    def variant(self) -> LoraVariant:
        return GatedVariant(self.config.init_log_alpha)

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        model = super().apply(model, ctx)
        # Lagrange multipliers of the density constraint (trained by gradient ascent), kept on the method
        self.multipliers = nn.Parameter(torch.zeros(2))
        return model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        return super().param_groups(model, lr, weight_decay) + [
            {"params": [self.multipliers], "lr": lr, "weight_decay": 0.0}]

    def density(self, model: nn.Module) -> torch.Tensor:
        return torch.stack([expected_density(m.lora_gate) for m in self.lora_layers(model)]).mean()

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        c = self.config
        gap = self.density(state.model) - c.target_density
        lagrangian = self.multipliers[0] * gap + self.multipliers[1] * gap ** 2
        ortho = 0.0
        if c.ortho_weight:
            for m in self.lora_layers(state.model):
                eye = torch.eye(m.rank, dtype=m.lora_A.dtype, device=m.lora_A.device)
                ortho = ortho + (m.lora_A @ m.lora_A.T - eye).pow(2).sum() + (m.lora_B.T @ m.lora_B - eye).pow(2).sum()
        return lagrangian + c.ortho_weight * ortho

    def on_after_backward(self, state: TrainState) -> None:
        if self.multipliers.grad is not None:
            self.multipliers.grad.neg_()   # ascent on the multipliers: max over lambda, min over the rest

    def on_train_end(self, state: TrainState) -> None:
        ranks = [int((gates(m.lora_gate, False) > 0).sum()) for m in self.lora_layers(state.model)]
        state.metrics["rank_mean"] = round(sum(ranks) / max(1, len(ranks)), 3)
        state.metrics["expected_density"] = round(self.density(state.model).item(), 4)
