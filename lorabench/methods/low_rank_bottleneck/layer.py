"""A LoRA layer that can also carry a high-rank update accumulated during training.

ReLoRA (arXiv 2307.05695), CoLA (2401.04151), FLoRA (2402.03293) and Delta-LoRA (2309.02411)
change the weight itself while training: h = (W0 + ΔW_acc) x + s B A x. The papers add ΔW_acc
into W0 in place; we keep it in a buffer `weight_delta` beside the frozen W0 instead, so that the
backbone stays pristine (the adapter can be saved, loaded and unmerged like any other) at the cost
of one weight copy per adapted layer (recorded as `delta_buffer_mb`). The buffer is created at
zero, so the layer is the base layer at initialisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.methods.lora.layer import LoraLinear, LoraVariant, init_matrix


class HighRankVariant(LoraVariant):
    """LoRA plus a buffer `weight_delta` (ΔW_acc, (d, k)) that hooks grow during training."""

    def __init__(self, init: str = "kaiming", zero_init: str = "B"):
        self.init_kind, self.zero_init = init, zero_init

    def init(self, layer: LoraLinear) -> None:
        layer.register_buffer("weight_delta", torch.zeros_like(layer.base.weight))

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        w = layer.base.weight + layer.weight_delta  # (W0 + ΔW_acc)
        if layer.kernel == "fused":
            from lorabench import ops
            return ops.lora_linear(x, w, layer.base.bias, layer.lora_A, layer.lora_B,
                                   layer.scale, layer.dropout_p, layer.training, kernel="fused")
        h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
        return F.linear(x, w, layer.base.bias) + F.linear(F.linear(h, layer.lora_A), layer.lora_B) * layer.scale

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return layer.weight_delta + layer.scale * (layer.lora_B @ layer.lora_A)

    @torch.no_grad()
    def merge_low_rank(self, layer: LoraLinear, factor: float = 1.0) -> None:
        """ΔW_acc += factor * s B A: the merge of a restart (with factor 1 and B zeroed afterwards the
        function is unchanged)."""
        layer.weight_delta += factor * layer.scale * (layer.lora_B @ layer.lora_A)

    @torch.no_grad()
    def reinit_low_rank(self, layer: LoraLinear) -> None:
        """A fresh LoRA start as at construction: one factor random, the other zero (B A = 0)."""
        random_, zero = (layer.lora_A, layer.lora_B) if self.zero_init == "B" else (layer.lora_B, layer.lora_A)
        init_matrix(random_, self.init_kind, layer.rank)
        zero.zero_()


def high_rank_layers(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear) and isinstance(m.variant, HighRankVariant)]


def delta_buffer_mb(model: nn.Module) -> float:
    return sum(m.weight_delta.numel() * m.weight_delta.element_size() for m in high_rank_layers(model)) / 2**20


def update_rank(layer: LoraLinear, rtol: float = 1e-4) -> int:
    """Numerical rank of the layer's whole update ΔW_acc + s B A (the quantity these papers raise)."""
    d = layer.delta_weight().detach().float()
    if not torch.any(d):
        return 0
    s = torch.linalg.svdvals(d)
    return int((s > rtol * s[0]).sum())


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer | None, params: list[nn.Parameter],
                          prune_ratio: float) -> None:
    """ReLoRA's optimizer reset (sec. 3 of arXiv 2307.05695): zero all but the largest-magnitude
    (1 - prune_ratio) of each Adam moment of `params`; prune_ratio=1 is a full reset."""
    if optimizer is None:
        return
    for p in params:
        st = optimizer.state.get(p)
        if not st:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            t = st.get(key)
            if t is None:
                continue
            if prune_ratio >= 1.0:
                t.zero_()
                continue
            k = int(round(prune_ratio * t.numel()))
            if k == 0:
                continue
            threshold = t.abs().flatten().kthvalue(k).values
            t.masked_fill_(t.abs() <= threshold, 0.0)
        if 0.0 < prune_ratio < 1.0 and "exp_avg" in st and "exp_avg_sq" in st:
            # A kept first moment over a pruned second moment would step by m / eps: drop it too.
            st["exp_avg"].masked_fill_(st["exp_avg_sq"] == 0, 0.0)


class HighRankLoRA:
    """Mixin for a `LoRA` subclass whose layers carry a HighRankVariant: their adapter includes the
    accumulated ΔW_acc buffers (a full-rank update needs full-size storage)."""

    def variant(self) -> LoraVariant:
        return HighRankVariant(self.config.init, self.config.zero_init)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().adapter_state_dict(model)
        state.update({n: b.detach() for n, b in model.named_buffers() if n.endswith("weight_delta")})
        return state

    def report_rank(self, state) -> None:
        layers = high_rank_layers(state.model)
        ranks = [update_rank(m) for m in layers]
        state.metrics["update_rank_mean"] = round(sum(ranks) / max(1, len(ranks)), 2)
        state.metrics["update_rank_max"] = max(ranks, default=0)
        state.metrics["delta_buffer_mb"] = round(delta_buffer_mb(state.model), 3)
