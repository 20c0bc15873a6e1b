"""BiLoRA: a bi-level optimization framework for overfitting-resilient low-rank adaptation
(Qiang, Zhang, Xie, arXiv 2403.13037).

The update is parameterised like an SVD (eq. (1)): ΔW = s P Λ Q with P (d, r), Q (r, k) and a
diagonal Λ (r). P and Q are the lower level, trained on the training split with an
orthogonality regulariser R = ||PᵀP - I||²_F + ||QQᵀ - I||²_F (eq. (2)); Λ is the upper level,
trained on a separate split (eq. (3)), so the singular values are chosen by data the
singular vectors never fitted. The two levels alternate (see bilevel.py for the split). Λ starts
at zero (ΔW = 0); P and Q start as random semi-orthogonal matrices (PᵀP = QQᵀ = I), so Λ has a
gradient from the first step and the regulariser starts at its minimum, 0. (A kaiming-random P of
576 rows has PᵀP ≈ 24 I: the regulariser was ~10⁴ per layer and the loss ~2e5, so the published
rows trained only to undo the init.) The record carries the regulariser against the task loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.lora import LoRA, LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant
from lorabench.methods.learning_procedure.bilevel import is_upper_step, keep_gradients


class SvdVariant(LoraVariant):
    """ΔW = s P diag(Λ) Q with P = lora_B (d, r), Q = lora_A (r, k), Λ = lora_E (r)."""

    def init(self, layer: LoraLinear) -> None:
        with torch.no_grad():   # the singular vectors: orthonormal columns of P, orthonormal rows of Q
            nn.init.orthogonal_(layer.lora_B)
            nn.init.orthogonal_(layer.lora_A)
        layer.lora_E = nn.Parameter(torch.zeros(layer.rank, dtype=layer.lora_A.dtype, device=layer.lora_A.device))

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return layer.scale * (layer.lora_B * layer.lora_E) @ layer.lora_A

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
        return layer.base(x) + ((h @ layer.lora_A.T) * layer.lora_E) @ layer.lora_B.T * layer.scale


def orthogonality(layer: LoraLinear) -> torch.Tensor:
    """eq. (2): ||PᵀP - I||²_F + ||QQᵀ - I||²_F."""
    p, q = layer.lora_B, layer.lora_A
    eye = torch.eye(layer.rank, dtype=p.dtype, device=p.device)
    return (p.T @ p - eye).pow(2).sum() + (q @ q.T - eye).pow(2).sum()


@dataclass
class BiLoraConfig(LoraConfig):
    upper_every: int = option(5, "every this many-th batch is an upper-level (validation) batch that trains only "
                                 "the singular values Λ; the others train P, Q and the head", low=2)
    ortho_weight: float = option(0.1, "weight of the orthogonality regulariser on P and Q (eq. (2))", low=0.0)

    def __post_init__(self):
        super().__post_init__()
        if self.kernel == "fused" or self.zero_init != "B":
            raise ValueError("bilora has its own SVD-form forward and init: use kernel='reference', zero_init='B'")


class BiLoRA(LoRA):
    name = "bilora"
    title = "BiLoRA: A Bi-level Optimization Framework for Overfitting-Resilient Low-Rank Adaptation"
    paper = "2403.13037"
    family = "learning-procedure"
    config_cls = BiLoraConfig
    mechanism_metrics = {
        "upper_steps": "steps that trained only the singular values Λ, on held-out (upper-level) batches",
        "orthogonality_loss": "the weighted regulariser ortho_weight * R(P, Q) at the last lower-level step (eq. (2))",
        "task_loss": "the task loss at that step, to compare with the regulariser",
        "orthogonality_mean": "R(P, Q) per layer at the end, unweighted",
        "singular_value_mean": "mean |Λ| at the end (0 at the start)",
    }

    def on_train_begin(self, state: TrainState) -> None:
        self.upper_steps = 0

    def variant(self) -> LoraVariant:
        return SvdVariant()

    def upper(self, model: nn.Module) -> set[int]:
        return {id(m.lora_E) for m in self.lora_layers(model)}

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        if self.config.ortho_weight == 0 or is_upper_step(state.step, self.config.upper_every):
            return None
        reg = self.config.ortho_weight * sum(orthogonality(m) for m in self.lora_layers(state.model))
        state.metrics["orthogonality_loss"] = round(float(reg.detach()), 6)
        return reg

    def on_after_backward(self, state: TrainState) -> None:
        trainable = [p for _, p in self.trainable_parameters(state.model)]
        upper = self.upper(state.model)
        if is_upper_step(state.step, self.config.upper_every):
            keep_gradients(trainable, upper)                                   # eq. (3): Λ on validation data
            self.upper_steps = getattr(self, "upper_steps", 0) + 1
        else:
            keep_gradients(trainable, {id(p) for p in trainable} - upper)      # P, Q (and head) on training data
            if state.loss is not None:   # the total minus the regulariser: the task loss of this batch
                state.metrics["task_loss"] = round(float(state.loss.detach()) - state.metrics.get("orthogonality_loss", 0.0), 6)

    def on_train_end(self, state: TrainState) -> None:
        layers = self.lora_layers(state.model)
        state.metrics["upper_steps"] = getattr(self, "upper_steps", 0)
        state.metrics.setdefault("orthogonality_loss", 0.0)
        state.metrics.setdefault("task_loss", None)
        state.metrics["singular_value_mean"] = round(
            float(torch.cat([m.lora_E.detach().abs() for m in layers]).mean()), 6) if layers else 0.0
        state.metrics["orthogonality_mean"] = round(
            float(sum(orthogonality(m).item() for m in layers)) / max(1, len(layers)), 5)
