"""MoRA: High-rank updating for parameter-efficient fine-tuning (Jiang et al., arXiv 2405.12130).

One square trainable matrix M (r_hat x r_hat) with r_hat = round(sqrt((d + k) r)), as many
parameters as a rank-r LoRA, between a non-parameterised compression of the input
(k -> r_hat) and decompression to the output (r_hat -> d) (eq. (2)): ΔW x = f_decomp(M f_comp(x)).
We implement the "sharing" operators (the paper's sec. 3, type 1 in its code): f_comp sums the
input in consecutive groups of r_hat features (wrapping around to pad), f_decomp repeats the
output to d features. M starts at zero, so ΔW = 0 at init; ΔW has rank up to r_hat, not r.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import MethodConfig, TrainState
from lorabench.methods.low_rank_bottleneck.layer import update_rank
from lorabench.methods.lora import LoRA
from lorabench.methods.lora.layer import LoraLinear, LoraVariant


def mora_rank(in_features: int, out_features: int, rank: int) -> int:
    return int(math.sqrt((in_features + out_features) * rank) + 0.5)  # as the paper's code rounds


class MoraVariant(LoraVariant):
    """Replaces A and B by one square M (r_hat x r_hat); layer.rank becomes r_hat."""

    def __init__(self, rank: int):
        self.lora_rank = rank

    def init(self, layer: LoraLinear) -> None:
        like = layer.lora_A
        del layer.lora_A, layer.lora_B
        layer.rank = r = mora_rank(layer.in_features, layer.out_features, self.lora_rank)
        layer.mora_M = nn.Parameter(torch.zeros(r, r, dtype=like.dtype, device=like.device))

    @staticmethod
    def compress(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        r, k = layer.rank, layer.in_features
        groups = math.ceil(k / r)
        if groups * r != k:
            x = torch.cat([x, x[..., : groups * r - k]], dim=-1)  # pad by wrapping, as the paper's code
        return x.reshape(*x.shape[:-1], groups, r).sum(dim=-2)     # (..., r_hat)

    @staticmethod
    def decompress(layer: LoraLinear, y: torch.Tensor) -> torch.Tensor:
        reps = math.ceil(layer.out_features / layer.rank)
        return y.repeat(*([1] * (y.dim() - 1)), reps)[..., : layer.out_features]  # (..., d)

    def delta(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        return self.decompress(layer, self.compress(layer, x) @ layer.mora_M.T)  # eq. (2)

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        eye = torch.eye(layer.in_features, dtype=layer.mora_M.dtype, device=layer.mora_M.device)
        return self.delta(layer, eye).T  # the operator is linear: its matrix is its action on the basis

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        return layer.base(x) + self.delta(layer, x)


@dataclass
class MoraConfig(MethodConfig):
    rank: int = option(8, "the LoRA rank r whose parameter budget M matches: r_hat = round(sqrt((d + k) r))",
                       low=1, high=4096)


class MoRA(LoRA):
    name = "mora"
    title = "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning"
    paper = "2405.12130"
    family = "low-rank-bottleneck"
    config_cls = MoraConfig
    default_lr = 2e-4  # M is not scaled by alpha/r; the paper uses lr 2e-4 to 3e-4 for r=8..256

    def make_layer(self, base: nn.Linear) -> nn.Module:
        return LoraLinear(base, 1, 1.0, variant=MoraVariant(self.config.rank))

    def on_train_end(self, state: TrainState) -> None:
        ranks = [update_rank(m) for m in self.lora_layers(state.model)]
        state.metrics["update_rank_mean"] = round(sum(ranks) / max(1, len(ranks)), 2)  # up to r_hat, not r
