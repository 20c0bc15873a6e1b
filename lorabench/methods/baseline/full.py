"""Baseline `full`: full fine-tuning, every parameter trained (the upper reference most LoRA papers
use); compared with every adapter method, not a LoRA method itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.methods.base import ApplyContext, Method


@dataclass
class FullConfig:
    """Full fine-tuning has no options of its own (learning rate etc. are training options)."""


class FullFineTuning(Method):
    name = "full"
    title = "Full fine-tuning"
    paper = ""
    family = "baseline"
    config_cls = FullConfig
    default_lr = 5e-5  # the usual BERT/Llama fine-tuning rate; 1e-3 diverges
    mergeable = False

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # The "adapter" of full fine-tuning is the whole model; tied weights are stored once.
        seen, out = set(), {}
        for n, t in model.state_dict().items():
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            out[n] = t.detach()
        return out

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {n for n in missing if any(n.endswith(s) for s in ("lm_head.weight", "decoder.weight"))}
        if set(missing) - tied or unexpected:
            raise ValueError(f"state does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
