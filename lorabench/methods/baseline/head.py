"""Baseline `head`: the backbone frozen, only the task head trained (the no-adaptation baseline); on
a causal-LM task there is no head, so it is the zero-shot base model. Not a LoRA method.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorabench.methods.base import ApplyContext, Method


@dataclass
class HeadConfig:
    """Training only the task head has no options of its own."""


class HeadOnly(Method):
    name = "head"
    title = "Frozen backbone, trained task head"
    paper = ""
    family = "baseline"
    config_cls = HeadConfig
    default_lr = 1e-3

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        self.freeze_all_but_head(model, ctx)
        return model
