"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., arXiv 2106.09685).

`LoRA` is also the base of every variant that changes only initialisation, scaling or the
forward delta (rsLoRA, DoRA, PiSSA, MiLoRA, LoRA-FA, LoRA+, QLoRA, ...): a subclass overrides
`scale()`, `variant()` (a `LoraVariant` strategy), `make_base()` or `freeze_adapter()`.
"""
from __future__ import annotations

import torch
from torch import nn

from lorabench.methods.base import ApplyContext, Method, replace_module, resolve_targets
from lorabench.methods.lora.config import LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant


class LoRA(Method):
    name = "lora"
    title = "LoRA: Low-Rank Adaptation of Large Language Models"
    paper = "2106.09685"
    family = "lora"
    config_cls = LoraConfig
    default_lr = 5e-4  # LoRA papers use 1e-4..2e-3 with AdamW; 5e-4 is stable on all our tasks
    mergeable = True

    def scale(self) -> float:
        return self.config.alpha / self.config.rank  # eq. (3): ΔW x scaled by alpha / r

    def variant(self) -> LoraVariant:
        """The strategy object of this LoRA variant (plain LoRA here)."""
        return LoraVariant()

    def make_base(self, base: nn.Linear) -> nn.Module:
        """The frozen base the adapter wraps (QLoRA/QA-LoRA return a quantized copy)."""
        return base

    def make_layer(self, base: nn.Linear) -> nn.Module:
        c = self.config
        return LoraLinear(self.make_base(base), c.rank, self.scale(), c.dropout, c.init, c.kernel,
                          variant=self.variant(), zero_init=c.zero_init)

    def freeze_adapter(self, layer: LoraLinear) -> None:
        """Adapter tensors that are not trained (LoRA-FA freezes A)."""

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        self.freeze_all_but_head(model, ctx)
        for name in resolve_targets(model, self.config.target_modules, ctx):
            layer = self.make_layer(model.get_submodule(name))
            self.freeze_adapter(layer)
            replace_module(model, name, layer)
        return model

    def lora_layers(self, model: nn.Module) -> list[LoraLinear]:
        return [m for m in model.modules() if isinstance(m, LoraLinear)]

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Trained tensors plus frozen adapter tensors that are random at init (LoRA-FA's A)."""
        out = {n: p.detach() for n, p in self.trainable_parameters(model)}
        for lname, layer in model.named_modules():
            if isinstance(layer, LoraLinear):
                for n, p in layer.named_parameters(recurse=False):
                    out.setdefault(f"{lname}.{n}", p.detach())
        return out

    def merge(self, model: nn.Module) -> None:
        for m in self.lora_layers(model):
            m.merge()

    def unmerge(self, model: nn.Module) -> None:
        for m in self.lora_layers(model):
            m.unmerge()
