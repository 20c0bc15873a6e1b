"""LoRA Dropout as a sparsity regularizer for overfitting control (Lin et al., arXiv 2404.09610).

Random masks drop whole input columns of A and output rows of B while training (sec. 3.1):
h = W0 x + s (m_B ⊙ B)(A ⊙ m_A^T) x with m_A ~ Bernoulli(1 - p_in)^k, m_B ~ Bernoulli(1 - p_out)^d,
one mask pair per forward pass shared by the whole batch (unlike dropout on the activations), and
rescaled by 1/(1 - p) so that E[ΔW] = s B A. The paper shows this bounds the update's sparsity
(a regulariser). At evaluation the expected update s B A is used, so the adapter merges as LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.lora import LoRA, LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant


def column_mask(n: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """Inverted-dropout mask of n features: 0 with probability p, else 1 / (1 - p)."""
    return torch.empty(n, dtype=like.dtype, device=like.device).bernoulli_(1.0 - p).div_(1.0 - p)


class LoraDropoutVariant(LoraVariant):
    def __init__(self, p_in: float, p_out: float):
        self.p_in, self.p_out = p_in, p_out
        self.counts = {"A": [0, 0], "B": [0, 0]}   # [dropped, seen] columns of A / rows of B, for the record

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        if not layer.training or (self.p_in == 0 and self.p_out == 0):
            return super().forward(layer, x)
        a, b = layer.lora_A, layer.lora_B
        if self.p_in > 0:
            m_a = column_mask(layer.in_features, self.p_in, a)
            a = a * m_a                                                       # A ⊙ m_A: drop input columns
            self.count("A", m_a)
        if self.p_out > 0:
            m_b = column_mask(layer.out_features, self.p_out, b)
            b = b * m_b[:, None]                                              # m_B ⊙ B: drop output rows
            self.count("B", m_b)
        return layer.base(x) + (x @ a.T @ b.T) * layer.scale

    def count(self, which: str, mask: torch.Tensor) -> None:
        self.counts[which][0] += int((mask == 0).sum())
        self.counts[which][1] += mask.numel()


@dataclass
class LoraDropoutConfig(LoraConfig):
    p_in: float = option(0.1, "probability of dropping each input column of A per forward pass", low=0.0, high=0.99)
    p_out: float = option(0.1, "probability of dropping each output row of B per forward pass", low=0.0, high=0.99)

    def __post_init__(self):
        super().__post_init__()
        if self.dropout > 0 or self.kernel == "fused":
            raise ValueError("lora-dropout replaces activation dropout by masks on A and B: use p_in / p_out, "
                             "dropout=0 and kernel='reference'")


class LoraDropout(LoRA):
    name = "lora-dropout"
    title = "LoRA Dropout as a Sparsity Regularizer for Overfitting Control"
    paper = "2404.09610"
    family = "learning-procedure"
    config_cls = LoraDropoutConfig
    mechanism_metrics = {
        "dropped_fraction_A": "observed fraction of the input columns of A dropped in training forwards",
        "dropped_fraction_B": "observed fraction of the output rows of B dropped",
    }

    def variant(self) -> LoraVariant:
        return LoraDropoutVariant(self.config.p_in, self.config.p_out)

    def on_train_end(self, state: TrainState) -> None:
        for which in ("A", "B"):
            dropped = sum(m.variant.counts[which][0] for m in self.lora_layers(state.model))
            seen = sum(m.variant.counts[which][1] for m in self.lora_layers(state.model))
            state.metrics[f"dropped_fraction_{which}"] = round(dropped / max(1, seen), 4)
