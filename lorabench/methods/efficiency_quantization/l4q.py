"""L4Q: Parameter Efficient Quantization-Aware Training on Large Language Models via LoRA-wise LSQ
(Jeon, Kim, Kim; arXiv 2402.04902).

QLoRA and QA-LoRA quantize first and fine-tune after: the quantization never sees the update, and the
result is a quantized base plus a high-precision adapter (QLoRA) or a constrained adapter (QA-LoRA).
L4Q does quantization-aware training *through* LoRA (sec. 3): the adapter is merged into the frozen
weight and the merged weight is fake-quantized in every forward pass,

    W' = W0 + s B A                                                    (L4Q sec. 3, the merged weight)
    W_q = clamp(round((W' - b) / d), Q_n, Q_p) d + b,   y = x W_q^T + bias     (the LSQ+ quantizer)

with a learnable step size d and offset b per group of inputs (LSQ, arXiv 1902.08153, and its
asymmetric LSQ+, arXiv 2004.09576), Q_n = 0 and Q_p = 2^bits - 1. Rounding passes gradients straight
through, so one backward pass trains A, B and the quantization parameters together (sec. 3.2):

    dW_q/dW' = 1 inside [Q_n, Q_p], 0 outside                          (STE with clipping; to B A)
    dW_q/dd  = round(v) - v inside, Q_n or Q_p outside, v = (W' - b) / d      (LSQ's step-size gradient)
    dW_q/db  = 0 inside, 1 outside                                     (LSQ+'s offset gradient)

and the gradients of d and b are scaled by 1 / sqrt(group_size * Q_p) (LSQ sec. 2.2). d and b start
at the min-max quantizer of W0 (d = (max - min) / Q_p, b = min per group); A random, B = 0 as LoRA.
Under Adam the gradient scale does not set the rate at which d and b move (Adam divides it out), so
they get their own, smaller learning rate (`quant_lr_ratio`, our choice, see its help).
After training the model is *fully* quantized: W_q is the deployed weight, without an adapter beside
it (`merge` writes W_q into the base weight, exactly what the layer computes).

Not reproduced: the paper's memory-optimised backward, which recomputes W' instead of storing it;
autograd here keeps the (out, in) intermediates, which costs memory, not correctness.

Mechanism metrics (method_metrics, mean over layers, after training): `step_size_rel_change`
(|d - d_0| / d_0, the learnt step sizes moving away from min-max), `offset_change_in_steps`
(|b - b_0| / d_0), `clipped_fraction` (weights of W' outside the quantization range) and
`quant_rel_err` (||W_q - W'||_F / ||W'||_F).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.lora import LoRA, LoraConfig, LoraLinear, LoraVariant
from lorabench.methods.efficiency_quantization.fake_quant import BITS, GROUP_SIZES, check_groups, grad_scale, grouped, round_ste


def lsq_quantize(w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, bits: int, group_size: int,
                 grad_factor: float = 1.0) -> torch.Tensor:
    """W_q = clamp(round((W - b) / d), 0, 2^bits - 1) d + b per group (LSQ+), with straight-through rounding;
    step, offset: (out, in / group_size); their gradients are multiplied by grad_factor (LSQ sec. 2.2)."""
    qp = 2 ** bits - 1
    d = grad_scale(step, grad_factor).clamp(min=1e-8)[..., None]      # (out, G, 1)
    b = grad_scale(offset, grad_factor)[..., None]
    v = (grouped(w, group_size) - b) / d                               # v = (W' - b) / d
    q = round_ste(v).clamp(0, qp)                                      # clamp(round(v), Q_n, Q_p)
    return (q * d + b).reshape_as(w)                                   # W_q = q d + b


class L4QVariant(LoraVariant):
    """The merged-then-quantized forward of L4Q; the step sizes and offsets are trained parameters."""

    def __init__(self, bits: int, group_size: int):
        self.bits, self.group_size = bits, group_size
        self.grad_factor = 1.0 / math.sqrt(group_size * (2 ** bits - 1))  # LSQ's g = 1 / sqrt(N_W Q_p)

    @torch.no_grad()
    def init(self, layer: LoraLinear) -> None:
        g = grouped(layer.base.weight.detach().float(), self.group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        step = ((hi - lo) / (2 ** self.bits - 1)).clamp(min=1e-8)     # min-max start: d = (max - min) / Q_p
        layer.quant_step = nn.Parameter(step.to(layer.base.weight.dtype))     # (out, in / group)
        layer.quant_offset = nn.Parameter(lo.to(layer.base.weight.dtype))     # b = min
        layer.merged_from = None

    def merged_weight(self, layer: LoraLinear) -> torch.Tensor:
        return layer.base.weight + layer.scale * (layer.lora_B @ layer.lora_A)   # W' = W0 + s B A

    def quantized_weight(self, layer: LoraLinear) -> torch.Tensor:
        return lsq_quantize(self.merged_weight(layer), layer.quant_step, layer.quant_offset, self.bits,
                            self.group_size, self.grad_factor)

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        if layer.dropout_p > 0 and layer.training:
            raise ValueError("l4q merges the adapter into the weight before quantizing it: LoRA dropout on the "
                             "input of B A has no place in that forward; set dropout to 0")
        return F.linear(x, self.quantized_weight(layer).to(x.dtype), layer.base.bias)

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return self.quantized_weight(layer) - layer.base.weight  # what merging adds: W_q - W0

    def merge(self, layer: LoraLinear) -> None:
        layer.merged_from = layer.base.weight.detach().clone()   # W0, to unmerge exactly
        layer.base.weight.copy_(self.quantized_weight(layer))      # the deployed, fully quantized weight

    def unmerge(self, layer: LoraLinear) -> None:
        layer.base.weight.copy_(layer.merged_from)
        layer.merged_from = None


@dataclass
class L4QConfig(LoraConfig):
    bits: int = option(4, "bit width of the fake-quantized merged weight (the paper: 4 and 3)", choices=BITS)
    group_size: int = option(128, "inputs sharing one step size and offset (the paper: 128); must divide every "
                                  "adapted layer's input width", choices=GROUP_SIZES)
    quant_lr_ratio: float = option(0.01, "learning rate of the step sizes and offsets relative to the LoRA factors'. "
                                         "Adam normalises gradients, so LSQ's gradient scale does not set their rate: "
                                         "an update of lr (5e-4) would exceed a 4-bit step of LLM weights (~1e-3) within "
                                         "a few steps; 0.01 moves d by ~1% of itself per step", low=0.0)

    def __post_init__(self):
        super().__post_init__()
        if self.dropout > 0:
            raise ValueError("l4q: dropout must be 0 (the adapter is merged into the weight before quantization)")
        if self.kernel != "reference":
            raise ValueError("l4q: kernel must be 'reference' (the fused lora_linear op does not fake-quantize)")


class L4Q(LoRA):
    name = "l4q"
    title = "L4Q: Parameter Efficient Quantization-Aware Training on Large Language Models via LoRA-wise LSQ"
    paper = "2402.04902"
    family = "efficiency-quantization"
    config_cls = L4QConfig
    default_lr = 5e-4  # as LoRA; the gradient scale g puts d and b on the same footing (LSQ sec. 2.2)
    mergeable = True   # into the fully quantized weight W_q, exactly (the point of L4Q)
    mechanism_metrics = {
        "step_size_rel_change": "mean |d - d_0| / d_0: the learnt LSQ step sizes moving away from the min-max start",
        "offset_change_in_steps": "mean |b - b_0| / d_0: the learnt offsets' move, in quantization steps",
        "clipped_fraction": "fraction of the merged weights W' = W0 + s B A outside the quantization range",
        "quant_rel_err": "mean ||W_q - W'||_F / ||W'||_F: the quantization error of the merged weight",
    }

    def variant(self) -> LoraVariant:
        return L4QVariant(self.config.bits, self.config.group_size)

    def make_layer(self, base: nn.Linear) -> nn.Module:
        check_groups(base.in_features, self.config.group_size, self.name)
        return super().make_layer(base)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        quant = [p for n, p in self.trainable_parameters(model) if n.endswith(("quant_step", "quant_offset"))]
        ids = {id(p) for p in quant}
        rest = [p for _, p in self.trainable_parameters(model) if id(p) not in ids]
        return [{"params": rest, "lr": lr, "weight_decay": weight_decay},
                {"params": quant, "lr": lr * self.config.quant_lr_ratio, "weight_decay": 0.0}]

    def l4q_layers(self, model: nn.Module) -> list[LoraLinear]:
        return [m for m in self.lora_layers(model) if isinstance(m.variant, L4QVariant)]

    def on_train_begin(self, state: TrainState) -> None:
        self._start = {id(m): (m.quant_step.detach().clone(), m.quant_offset.detach().clone())
                       for m in self.l4q_layers(state.model)}

    @torch.no_grad()
    def on_train_end(self, state: TrainState) -> None:
        step_change, offset_change, clipped, err = [], [], [], []
        for m in self.l4q_layers(state.model):
            d0, b0 = self._start[id(m)]
            step_change.append(((m.quant_step - d0).abs() / d0).mean().item())
            offset_change.append(((m.quant_offset - b0).abs() / d0).mean().item())
            w = m.variant.merged_weight(m).float()
            v = (grouped(w, m.variant.group_size) - m.quant_offset[..., None]) / m.quant_step[..., None]
            clipped.append(((v < -0.5) | (v > 2 ** m.variant.bits - 0.5)).float().mean().item())
            err.append(((m.variant.quantized_weight(m) - w).norm() / w.norm()).item())
        n = len(err)
        state.metrics.update({"step_size_rel_change": sum(step_change) / n,
                              "offset_change_in_steps": sum(offset_change) / n,
                              "clipped_fraction": sum(clipped) / n, "quant_rel_err": sum(err) / n})
