"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., arXiv 2106.09685)."""
from __future__ import annotations

from torch import nn

from lorabench.methods.base import ApplyContext, Method, replace_module, resolve_targets
from lorabench.methods.lora.config import LoraConfig
from lorabench.methods.lora.layer import LoraLinear


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

    def make_layer(self, base: nn.Linear) -> nn.Module:
        c = self.config
        return LoraLinear(base, c.rank, self.scale(), c.dropout, c.init, c.kernel)

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        self.freeze_all_but_head(model, ctx)
        for name in resolve_targets(model, self.config.target_modules, ctx):
            replace_module(model, name, self.make_layer(model.get_submodule(name)))
        return model

    def lora_layers(self, model: nn.Module) -> list[LoraLinear]:
        return [m for m in model.modules() if isinstance(m, LoraLinear)]

    def merge(self, model: nn.Module) -> None:
        for m in self.lora_layers(model):
            m.merge()

    def unmerge(self, model: nn.Module) -> None:
        for m in self.lora_layers(model):
            m.unmerge()
