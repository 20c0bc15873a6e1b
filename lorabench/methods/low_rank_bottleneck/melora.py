"""MELoRA: Mini-Ensemble Low-Rank Adapters (Ren et al., arXiv 2402.17263).

n mini LoRAs of rank r, each on one 1/n slice of the input and output features, concatenated
along the diagonal (eq. (5)): ΔW = diag(B_1 A_1, ..., B_n A_n), B_i (d/n, r), A_i (r, k/n). It
trains r (d + k) parameters, as many as one rank-r LoRA, but ΔW has rank up to n r.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.low_rank_bottleneck.layer import update_rank
from lorabench.methods.lora import LoRA, LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant


class MeloraVariant(LoraVariant):
    """n diagonal blocks: A (n, r, k/n), B (n, d/n, r)."""

    def __init__(self, n_mini: int):
        self.n_mini = n_mini

    def init(self, layer: LoraLinear) -> None:
        n, r, d, k = self.n_mini, layer.rank, layer.out_features, layer.in_features
        if d % n or k % n:
            raise ValueError(f"melora: n_mini={n} must divide both in_features={k} and out_features={d}")
        like = layer.lora_A
        layer.lora_A = nn.Parameter(torch.empty(n, r, k // n, dtype=like.dtype, device=like.device))
        layer.lora_B = nn.Parameter(torch.zeros(n, d // n, r, dtype=like.dtype, device=like.device))
        for a in layer.lora_A:  # each A_i as an nn.Linear(k/n, r) init; each B_i = 0
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return layer.scale * torch.block_diag(*(layer.lora_B @ layer.lora_A))  # eq. (5), (d, k)

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
        h = h.reshape(*x.shape[:-1], self.n_mini, -1)                 # (..., n, k/n)
        h = torch.einsum("...nk,nrk->...nr", h, layer.lora_A)         # (..., n, r)
        h = torch.einsum("...nr,ndr->...nd", h, layer.lora_B)         # (..., n, d/n)
        return layer.base(x) + h.reshape(*x.shape[:-1], layer.out_features) * layer.scale


@dataclass
class MeloraConfig(LoraConfig):
    n_mini: int = option(2, "number n of mini LoRAs on the diagonal; must divide the in and out features of "
                            "every target (the paper uses 2-16)", low=1)

    def __post_init__(self):
        super().__post_init__()
        if self.kernel == "fused" or self.zero_init != "B" or self.init != "kaiming":
            raise ValueError("melora has its own block-diagonal forward and init (A_i kaiming, B_i = 0): "
                             "keep kernel='reference', init='kaiming', zero_init='B'")


class MELoRA(LoRA):
    name = "melora"
    title = "MELoRA: Mini-Ensemble Low-Rank Adapters for Parameter-Efficient Fine-Tuning"
    paper = "2402.17263"
    family = "low-rank-bottleneck"
    config_cls = MeloraConfig

    def variant(self) -> LoraVariant:
        return MeloraVariant(self.config.n_mini)

    def on_train_end(self, state: TrainState) -> None:
        ranks = [update_rank(m) for m in self.lora_layers(state.model)]
        state.metrics["update_rank_mean"] = round(sum(ranks) / max(1, len(ranks)), 2)  # up to n r, not r
