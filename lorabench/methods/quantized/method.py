"""QLoRA, LoftQ and QA-LoRA as LoRA variants over the frozen 4-bit layers of lorabench.ops.modules.

The quantized tensors are not saved with an adapter: quantization is deterministic, so applying the
method to the same base model rebuilds them exactly (QA-LoRA's merged zero points excepted: a merged
model is saved whole)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.lora import LoRA, LoraConfig, LoraLinear, LoraVariant
from lorabench.ops import int4 as int4_ops
from lorabench.ops import nf4 as nf4_ops
from lorabench.ops.modules import Int4Linear, NF4Linear


@dataclass
class QLoraConfig(LoraConfig):
    blocksize: int = option(64, "NF4 block size (QLoRA: 64)", choices=nf4_ops.BLOCKSIZES)
    double_quant: bool = option(True, "quantize the absmax constants too (QLoRA sec. 3, 'Double Quantization')")


@dataclass
class LoftQConfig(QLoraConfig):
    iterations: int = option(5, "alternating steps T of quantization and SVD (Algorithm 1 of LoftQ; 1..5 in the paper)",
                             low=1, high=50)


@dataclass
class QALoraConfig(LoraConfig):
    group_size: int = option(32, "inputs per int4 quantization group; A acts on their average (QA-LoRA L = in/group)",
                             choices=int4_ops.GROUP_SIZES)


class NF4LoraVariant(LoraVariant):
    """LoRA over an NF4 base: eq. (5) of QLoRA, through the fused nf4_linear op."""

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        base: NF4Linear = layer.base
        if layer.dropout_p > 0 and layer.training:
            h = F.dropout(x, layer.dropout_p, True)
            return base(x) + F.linear(F.linear(h, layer.lora_A), layer.lora_B) * layer.scale
        return base.forward_lora(x, layer.lora_A, layer.lora_B, layer.scale)

    def merge(self, layer: LoraLinear) -> None:
        raise NotImplementedError("an NF4 base cannot absorb the adapter without re-quantizing it (lossy)")

    unmerge = merge


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


class QALoraVariant(LoraVariant):
    """QA-LoRA sec. 3.3: y = W_int4 x + s B A pool(x), pool = mean over each group of inputs."""

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        base: Int4Linear = layer.base
        if layer.dropout_p > 0 and layer.training:
            h = F.dropout(x, layer.dropout_p, True)
            pooled = h.reshape(*h.shape[:-1], -1, base.group_size).mean(-1)  # (..., in / group)
            return base(x) + F.linear(F.linear(pooled, layer.lora_A), layer.lora_B) * layer.scale
        return base.forward_lora(x, layer.lora_A, layer.lora_B, layer.scale)

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        g = layer.base.group_size
        # every input of group j gets s (B A)[:, j] / g: the dense equivalent of A acting on the group mean
        return (layer.scale / g) * (layer.lora_B @ layer.lora_A).repeat_interleave(g, dim=1)  # (out, in)

    def merge(self, layer: LoraLinear) -> None:
        layer.base.merge_lora(layer.lora_A, layer.lora_B, layer.scale)  # zero' = zero + s (B A) / g

    def unmerge(self, layer: LoraLinear) -> None:
        base: Int4Linear = layer.base
        base.zeros.sub_((layer.scale / base.group_size) * (layer.lora_B.float() @ layer.lora_A.float()))


class QLoRA(LoRA):
    name = "qlora"
    title = "QLoRA: Efficient Finetuning of Quantized LLMs"
    paper = "2305.14314"
    family = "efficiency-quantization"
    config_cls = QLoraConfig
    default_lr = 5e-4
    mergeable = False  # merging into NF4 needs re-quantization

    def make_base(self, base: nn.Linear) -> nn.Module:
        return NF4Linear.from_linear(base, self.config.blocksize, self.config.double_quant,
                                     compute_dtype=base.weight.dtype)

    def variant(self) -> LoraVariant:
        return NF4LoraVariant()


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


class QALoRA(LoRA):
    name = "qa-lora"
    title = "QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models"
    paper = "2309.14717"
    family = "efficiency-quantization"
    config_cls = QALoraConfig
    default_lr = 5e-4
    mergeable = True  # into the int4 zero points, exactly (sec. 3.3)

    def make_base(self, base: nn.Linear) -> nn.Module:
        if base.in_features % self.config.group_size:
            raise ValueError(f"qa-lora: group_size {self.config.group_size} does not divide in_features "
                             f"{base.in_features}; choose one of {int4_ops.GROUP_SIZES} that does")
        q = Int4Linear.from_linear(base, self.config.group_size, compute_dtype=base.weight.dtype)
        # merging moves the zero points (sec. 3.3): make them a frozen parameter of the model, like
        # the base weight that a LoRA merge changes, so that they are part of the model's weights
        zeros = q.zeros
        del q._buffers["zeros"]
        q.zeros = nn.Parameter(zeros, requires_grad=False)
        return q

    def make_layer(self, base: nn.Linear) -> nn.Module:
        c = self.config
        return LoraLinear(self.make_base(base), c.rank, self.scale(), c.dropout, c.init, c.kernel,
                          variant=QALoraVariant(), zero_init=c.zero_init,
                          a_features=base.in_features // c.group_size)  # A: (r, in / group)
