"""QA-LoRA (arXiv 2309.14717): LoRA over a frozen group-wise int4 base (`Int4Linear` of
lorabench.ops.modules) whose A acts on the input averaged over each quantization group (sec. 3.3),
so that the trained adapter merges into the int4 zero points exactly.

The quantized tensors are not saved with an adapter: quantization is deterministic, so applying the
method to the same base model rebuilds them exactly (merged zero points excepted: a merged model is
saved whole)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.lora import LoRA, LoraConfig, LoraLinear, LoraVariant
from lorabench.ops import int4 as int4_ops
from lorabench.ops.modules import Int4Linear


@dataclass
class QALoraConfig(LoraConfig):
    group_size: int = option(32, "inputs per int4 quantization group; A acts on their average (QA-LoRA L = in/group)",
                             choices=int4_ops.GROUP_SIZES)


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
