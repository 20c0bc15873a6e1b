"""QLoRA (arXiv 2305.14314): LoRA over a frozen NF4 base (`NF4Linear` of lorabench.ops.modules).

The quantized tensors are not saved with an adapter: quantization is deterministic, so applying the
method to the same base model rebuilds them exactly."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.lora import LoRA, LoraConfig, LoraLinear, LoraVariant
from lorabench.ops import nf4 as nf4_ops
from lorabench.ops.modules import NF4Linear


@dataclass
class QLoraConfig(LoraConfig):
    blocksize: int = option(64, "NF4 block size (QLoRA: 64)", choices=nf4_ops.BLOCKSIZES)
    double_quant: bool = option(True, "quantize the absmax constants too (QLoRA sec. 3, 'Double Quantization')")


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
