"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., arXiv 2402.09353).

W' = m * (W0 + s B A) / ||W0 + s B A||_c   (eq. (5) of DoRA)

with a trainable magnitude m (one scalar per output row, initialised to ||W0||_c, eq. (2)) and the
direction updated by LoRA. The norm is detached in the backward pass (sec. 4.3, "gradient analysis":
it is treated as a constant to save memory), as PEFT does. The norm runs over each output row of
the (out, in) weight (PEFT's convention), so results equal PEFT's `LoraConfig(use_dora=True)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.methods.lora import LoRA, LoraLinear, LoraVariant


def weight_norm(layer: LoraLinear) -> torch.Tensor:
    """||W0 + s B A||_c per output row, detached (sec. 4.3 of DoRA). (out,)"""
    w = layer.base.weight + layer.scale * (layer.lora_B @ layer.lora_A)
    return torch.linalg.norm(w, dim=1).detach()


class DoraVariant(LoraVariant):
    def init(self, layer: LoraLinear) -> None:
        with torch.no_grad():
            m = weight_norm(layer)  # eq. (2): m = ||W0||_c (B A = 0 at init)
        layer.lora_magnitude = nn.Parameter(m.clone())  # (out,)

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        if layer.kernel == "fused":
            from lorabench import ops
            return ops.dora_linear(x, layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B,
                                   layer.lora_magnitude, layer.scale, layer.dropout_p, layer.training, kernel="fused")
        mag_norm_scale = layer.lora_magnitude / weight_norm(layer)  # m / ||W0 + sBA||_c, (out,)
        base = layer.base(x)
        if layer.dropout_p > 0 and layer.training:
            # PEFT's DoraLinearLayer: the base path sees x, the DoRA correction sees dropout(x).
            x = F.dropout(x, layer.dropout_p, True)
            base_nobias = F.linear(x, layer.base.weight)
        else:
            base_nobias = base if layer.base.bias is None else base - layer.base.bias
        lora = F.linear(F.linear(x, layer.lora_A), layer.lora_B) * layer.scale
        # eq. (5): W' x = (m/n) (W0 x + s B A x); written as a correction of the base output
        return base + (mag_norm_scale - 1) * base_nobias + mag_norm_scale * lora

    def merge(self, layer: LoraLinear) -> None:
        n = weight_norm(layer)
        layer._merged_norm = n  # unmerging needs the norm of the unmerged weight
        factor = (layer.lora_magnitude / n)[:, None]
        layer.base.weight.copy_(factor * (layer.base.weight + self.delta_weight(layer)))  # eq. (5)

    def unmerge(self, layer: LoraLinear) -> None:
        factor = (layer.lora_magnitude / layer._merged_norm)[:, None]
        layer.base.weight.copy_(layer.base.weight / factor - self.delta_weight(layer))
        del layer._merged_norm


class DoRA(LoRA):
    name = "dora"
    title = "DoRA: Weight-Decomposed Low-Rank Adaptation"
    paper = "2402.09353"
    family = "low-rank-bottleneck"
    default_lr = 5e-4
    mechanism_metrics = {
        "magnitude_change_mean": "ΔM of DoRA's eq. (6): mean |m - ||W0||_c| over the output rows and layers",
        "direction_change_mean": "ΔD of eq. (6): mean 1 - cos(W0 + s B A, W0) over the output rows and layers",
    }

    def variant(self) -> LoraVariant:
        return DoraVariant()

    @torch.no_grad()
    def on_train_end(self, state) -> None:
        dm, dd = [], []
        for layer in self.lora_layers(state.model):
            w0 = layer.base.weight
            v = w0 + layer.scale * (layer.lora_B @ layer.lora_A)
            dm.append((layer.lora_magnitude - torch.linalg.norm(w0, dim=1)).abs().mean())
            dd.append((1 - F.cosine_similarity(v, w0, dim=1)).mean())
        state.metrics["magnitude_change_mean"] = round(float(torch.stack(dm).mean()), 8) if dm else 0.0
        state.metrics["direction_change_mean"] = round(float(torch.stack(dd).mean()), 8) if dd else 0.0
