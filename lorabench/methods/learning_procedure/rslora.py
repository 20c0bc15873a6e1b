"""rsLoRA: rank-stabilised LoRA (Kalajdzievski, arXiv 2312.03732).

LoRA with the scaling factor alpha / sqrt(r) instead of alpha / r (Theorem 3.2 of rsLoRA: only
gamma_r in Theta(1/sqrt(r)) keeps the adapter's activations and gradients stable as r grows).
Identical to PEFT's `LoraConfig(use_rslora=True)`.
"""
from __future__ import annotations

import math

from lorabench.methods.lora import LoRA


class RsLoRA(LoRA):
    name = "rslora"
    title = "rsLoRA: A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"
    paper = "2312.03732"
    family = "learning-procedure"

    def scale(self) -> float:
        return self.config.alpha / math.sqrt(self.config.rank)  # gamma_r = alpha / sqrt(r), Theorem 3.2
