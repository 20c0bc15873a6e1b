"""LoRA-SP: Streamlined Partial Parameter Adaptation (Wu et al., arXiv 2403.08822).

A fixed random half of the entries of A and of B is frozen at its initial value for the whole of
training ("randomized half-selective parameter freezing"): their gradients are masked after the
backward pass, and after the optimizer step the frozen entries are put back (so weight decay
cannot move them either). Only the selected entries have optimizer updates; the record carries
their count as `updated_params`. The masks come from the trial seed, so a run is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState
from lorabench.methods.lora import LoRA, LoraConfig


@dataclass
class LoraSPConfig(LoraConfig):
    update_fraction: float = option(0.5, "fraction of the entries of A and of B that are trained; the rest stay "
                                         "frozen at their init (the paper's half-selection: 0.5)",
                                    low=0.01, high=1.0)


class LoraSP(LoRA):
    name = "lora-sp"
    title = "LoRA-SP: Streamlined Partial Parameter Adaptation for Resource-Efficient Fine-Tuning of LLMs"
    paper = "2403.08822"
    family = "efficiency-freezing-sharing"
    config_cls = LoraSPConfig
    mechanism_metrics = {
        "updated_params": "entries of A and B that the masks let train",
        "adapter_params": "all entries of A and B",
    }

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        model = super().apply(model, ctx)
        g = torch.Generator().manual_seed(ctx.seed)
        self.masks: dict[nn.Parameter, torch.Tensor] = {}
        for layer in self.lora_layers(model):
            for p in (layer.lora_A, layer.lora_B):
                self.masks[p] = (torch.rand(p.shape, generator=g) < self.config.update_fraction).to(p.device)
        return model

    def on_train_begin(self, state: TrainState) -> None:
        self.frozen_values = {p: p.detach().clone() for p in self.masks}
        state.metrics["updated_params"] = int(sum(int(m.sum()) for m in self.masks.values()))
        state.metrics["adapter_params"] = int(sum(m.numel() for m in self.masks.values()))

    def on_after_backward(self, state: TrainState) -> None:
        for p, m in self.masks.items():
            if p.grad is not None:
                p.grad.mul_(m)  # frozen entries get no gradient

    @torch.no_grad()
    def on_step_end(self, state: TrainState) -> None:
        for p, m in self.masks.items():
            p.copy_(torch.where(m, p, self.frozen_values[p]))  # and no update at all (weight decay)
