"""ResLoRA: Identity Residual Mapping in Low-Rank Adaption (Shi et al., arXiv 2402.18039).

Input-shortcut ResLoRA (sec. 3.1, "ResLoRA_is", the paper's best structure): while training,
the LoRA of block l also receives the input of the same module in block l - 1:
h_l = W0 x_l + s B_l A_l (x_l + x_{l-1}), a residual path that shortens the gradient's way
through the stacked LoRA blocks. x_{l-1} does not exist in a plain model, so for inference the
paths are merged (sec. 3.2): x_{l-1} is approximated by alpha_l x_l, turning block l into plain
LoRA with update s (1 + alpha_l) B_l A_l. The paper derives alpha from weight norms; we estimate
it directly as the running mean (during training) of ||x_{l-1}|| / ||x_l|| over tokens, kept in a
buffer `reslora_alpha` of each layer and saved with the adapter. Training mode uses the residual
form; evaluation and `merge` use the merged form.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState
from lorabench.methods.lora import LoRA, LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant

BLOCK_INDEX = re.compile(r"\.(\d+)\.")


class ResLoraVariant(LoraVariant):
    def __init__(self, momentum: float):
        self.momentum = momentum
        self.prev: LoraLinear | None = None   # the same module one block below (set by ResLoRA.apply)

    def init(self, layer: LoraLinear) -> None:
        layer.register_buffer("reslora_alpha", torch.zeros((), dtype=layer.lora_A.dtype, device=layer.lora_A.device))
        layer.last_input = None

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        layer.last_input = x if layer.training else None
        h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
        prev = self.prev.last_input if (layer.training and self.prev is not None) else None
        if prev is not None and prev.shape == x.shape:
            with torch.no_grad():  # running estimate of alpha = ||x_{l-1}|| / ||x_l|| for the merged form
                ratio = (prev.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).mean()
                layer.reslora_alpha.mul_(self.momentum).add_((1 - self.momentum) * ratio)
            lora = F.linear(F.linear(h + prev, layer.lora_A), layer.lora_B)          # B A (x_l + x_{l-1})
            return layer.base(x) + lora * layer.scale
        return layer.base(x) + F.linear(F.linear(h, layer.lora_A), layer.lora_B) * layer.scale * (1 + layer.reslora_alpha)

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return layer.scale * (1 + layer.reslora_alpha) * (layer.lora_B @ layer.lora_A)  # the merged form


@dataclass
class ResLoraConfig(LoraConfig):
    alpha_momentum: float = option(0.99, "momentum of the running estimate of alpha = ||x_{l-1}|| / ||x_l||, "
                                         "used to merge the shortcut for inference", low=0.0, high=0.9999)

    def __post_init__(self):
        super().__post_init__()
        if self.kernel == "fused":
            raise ValueError("reslora has its own forward (the shortcut input): use kernel='reference'")


class ResLoRA(LoRA):
    name = "reslora"
    title = "ResLoRA: Identity Residual Mapping in Low-Rank Adaption"
    paper = "2402.18039"
    family = "learning-procedure"
    config_cls = ResLoraConfig
    mechanism_metrics = {
        "merge_alpha_mean": "mean running alpha = ||x_{l-1}|| / ||x_l|| used to fold the residual path when merging",
    }

    def variant(self) -> LoraVariant:
        return ResLoraVariant(self.config.alpha_momentum)

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        model = super().apply(model, ctx)
        chains: dict[str, list[tuple[int, LoraLinear]]] = defaultdict(list)
        for name, layer in model.named_modules():
            m = BLOCK_INDEX.search(name)
            if isinstance(layer, LoraLinear) and m:
                chains[BLOCK_INDEX.sub(".#.", name, count=1)].append((int(m.group(1)), layer))
        for chain in chains.values():
            chain.sort(key=lambda t: t[0])
            for (_, lower), (_, upper) in zip(chain, chain[1:]):
                upper.variant.prev = lower  # x_{l-1}: the input of the same module one block below
        return model

    def on_train_end(self, state: TrainState) -> None:
        alphas = [float(m.reslora_alpha) for m in self.lora_layers(state.model) if m.variant.prev is not None]
        state.metrics["merge_alpha_mean"] = round(sum(alphas) / max(1, len(alphas)), 4)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().adapter_state_dict(model)
        state.update({n: b.detach() for n, b in model.named_buffers() if n.endswith("reslora_alpha")})
        return state
