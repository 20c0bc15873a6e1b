"""LoftQ (arXiv 2310.08659): QLoRA whose NF4 base and LoRA adapter are initialised jointly
(Algorithm 1 of LoftQ), so that Q + s B A approximates W better than Q alone does."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.efficiency_quantization.qlora import NF4LoraVariant, QLoRA, QLoraConfig
from lorabench.methods.lora import LoraLinear, LoraVariant
from lorabench.ops import nf4 as nf4_ops
from lorabench.ops.modules import NF4Linear


@dataclass
class LoftQConfig(QLoraConfig):
    iterations: int = option(5, "alternating steps T of quantization and SVD (Algorithm 1 of LoftQ; 1..5 in the paper)",
                             low=1, high=50)


class LoftQVariant(NF4LoraVariant):
    """Algorithm 1 of LoftQ: alternate the NF4 quantization Q and the rank-r SVD of the residual W - Q."""

    def __init__(self, iterations: int, double_quant: bool):
        self.iterations, self.double_quant = iterations, double_quant

    @torch.no_grad()
    def init(self, layer: LoraLinear) -> None:
        base: NF4Linear = layer.base
        W = base.original_weight.float()  # (out, in); kept only during init
        r, s = layer.rank, layer.scale
        lowrank = torch.zeros_like(W)  # s B_0 A_0 = 0
        for _ in range(self.iterations):
            # Q_t = q_N(W - s B_{t-1} A_{t-1})
            base.load_state(nf4_ops.nf4_quantize(W - lowrank, base.blocksize, self.double_quant))
            residual = W - base.dequantize(torch.float32)
            U, S, Vh = torch.linalg.svd(residual, full_matrices=False)  # SVD(W - Q_t)
            sqrt_s = torch.sqrt(S[:r] / s)
            layer.lora_A.copy_(sqrt_s[:, None] * Vh[:r])  # A_t = sqrt(S_r / s) V_r^T
            layer.lora_B.copy_(U[:, :r] * sqrt_s[None])  # B_t = U_r sqrt(S_r / s)
            lowrank = s * layer.lora_B @ layer.lora_A
        del base.original_weight


class LoftQ(QLoRA):
    name = "loftq"
    title = "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models"
    paper = "2310.08659"
    config_cls = LoftQConfig

    def make_base(self, base: nn.Linear) -> nn.Module:
        q = super().make_base(base)
        q.original_weight = base.weight.detach()  # read once by LoftQVariant.init, then dropped
        return q

    def variant(self) -> LoraVariant:
        return LoftQVariant(self.config.iterations, self.config.double_quant)
