"""LoRA's options (arXiv 2106.09685, section 4.1)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lorabench.config import option
from lorabench.methods.base import MethodConfig


@dataclass
class LoraConfig(MethodConfig):
    rank: int = option(8, "rank r of the update B A (r << min(d, k))", low=1, high=4096)
    alpha: float = option(16.0, "scaling numerator: the update is scaled by alpha / r (eq. (3) of LoRA)", low=0.0)
    dropout: float = option(0.0, "dropout probability on the input of the low-rank path", low=0.0, high=0.99)
    init: Literal["kaiming", "gaussian"] = option(
        "kaiming", "initialisation of the random factor (the other starts at zero so that B A = 0 at step 0): "
                   "'kaiming' uniform with a=sqrt(5) as nn.Linear and PEFT, or 'gaussian' N(0, 1/r) as in the "
                   "paper's section 4.1")
    zero_init: Literal["B", "A"] = option(
        "B", "which factor starts at zero: 'B' (LoRA, 'Init[A]' of arXiv 2406.08447, which finds it allows "
             "larger learning rates) or 'A' ('Init[B]': B random, A = 0)")
    kernel: Literal["reference", "fused"] = option(
        "reference", "'fused': lorabench's lora_linear custom op (C++/CUDA); 'reference': the eager formula "
                     "base(x) + B(A(dropout(x))) * s")

    def __post_init__(self):
        if self.alpha == 0:
            raise ValueError("alpha=0 makes the update vanish; use a positive alpha")
