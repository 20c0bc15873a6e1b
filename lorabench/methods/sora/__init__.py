"""SoRA: Sparse Low-Rank Adaptation of Pre-trained Language Models (Ding et al., arXiv 2311.11696).

LoRA with a gate vector g (r,) between the factors, h = W0 x + s B diag(g) A x (eq. (4) of SoRA),
and a proximal gradient step on g after every optimizer step that sparsifies it (eq. (6)):

  g <- sign(g) ⊙ max(|g| - η λ, 0)

where η is the current learning rate of the gate. Ranks whose gate reaches zero are pruned: the
effective rank of each layer is the number of non-zero gates (recorded as `sora_ranks`). Done in
the `on_step_end` hook.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.lora import LoRA, LoraConfig, LoraLinear, LoraVariant


@dataclass
class SoraConfig(LoraConfig):
    sparse_lambda: float = option(0.1, "λ of the L1 proximal step on the gate (eq. (6)); larger prunes more ranks",
                                  low=0.0)


class GateVariant(LoraVariant):
    def init(self, layer: LoraLinear) -> None:
        layer.lora_gate = nn.Parameter(torch.ones(layer.rank, dtype=layer.lora_A.dtype, device=layer.lora_A.device))

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
        # eq. (4): W0 x + s B (g ⊙ A x)
        return layer.base(x) + F.linear(layer.lora_gate * F.linear(h, layer.lora_A), layer.lora_B) * layer.scale

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return layer.scale * (layer.lora_B @ (layer.lora_gate[:, None] * layer.lora_A))


def soft_threshold_(g: torch.Tensor, threshold: float) -> None:
    """eq. (6): the proximal operator of threshold * ||g||_1."""
    with torch.no_grad():
        g.copy_(torch.sign(g) * torch.clamp(g.abs() - threshold, min=0.0))


class SoRA(LoRA):
    name = "sora"
    title = "Sparse Low-rank Adaptation of Pre-trained Language Models"
    paper = "2311.11696"
    family = "dynamic-rank"
    config_cls = SoraConfig
    default_lr = 5e-4

    def variant(self) -> LoraVariant:
        return GateVariant()

    def on_step_end(self, state: TrainState) -> None:
        lr_of = {id(p): g["lr"] for g in state.optimizer.param_groups for p in g["params"]}
        ranks = []
        for layer in self.lora_layers(state.model):
            soft_threshold_(layer.lora_gate, lr_of[id(layer.lora_gate)] * self.config.sparse_lambda)
            ranks.append(int(torch.count_nonzero(layer.lora_gate)))
        state.metrics["sora_ranks"] = ranks
