"""DropBP: Accelerating Fine-Tuning by Dropping Backward Propagation (Woo et al., arXiv 2402.17812).

In a residual block y = x + f(x), DropBP keeps the forward pass exact and, with probability p,
skips the backward pass through f: y = x + f(x).detach() (eq. (2)); the gradient still reaches
lower layers through the residual x. Applied here on top of LoRA, to each attention and MLP
sublayer (Llama: `self_attn`, `mlp`; BERT, whose residual add sits inside the output module:
the attention core `attention.self` and the MLP's `intermediate`). A forward hook detaches a
dropped sublayer's output during training; the drop set is drawn each step from the trial seed.
We use one drop rate for every sublayer (the paper's uniform setting; its sensitivity-based
per-layer rates are not implemented). At least one sublayer keeps its backward each step so
that the loss always reaches a trained parameter. The record carries the fraction of sublayer
backward passes actually skipped (`backward_dropped_fraction`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState
from lorabench.methods.lora import LoRA, LoraConfig

SUBLAYERS = {"llama": ["self_attn", "mlp"], "bert": ["attention.self", "intermediate"]}


@dataclass
class DropBPConfig(LoraConfig):
    drop_rate: float = option(0.5, "probability p that a sublayer's backward pass is skipped in a step (the paper's "
                                   "target average drop rate, 0.5 or 0.75)", low=0.0, high=0.99)
    sublayers: list[str] | None = option(None, "module-name suffixes of the residual sublayers to drop; None = "
                                               "the architecture's attention and MLP (" +
                                               "; ".join(f"{k}: {', '.join(v)}" for k, v in SUBLAYERS.items()) + ")")


def detach_output(output):
    if isinstance(output, tuple):
        return (output[0].detach(),) + output[1:]
    return output.detach()


class DropBP(LoRA):
    name = "dropbp"
    title = "DropBP: Accelerating Fine-Tuning of Large Language Models by Dropping Backward Propagation"
    paper = "2402.17812"
    family = "efficiency-freezing-sharing"
    config_cls = DropBPConfig
    mechanism_metrics = {
        "backward_dropped_fraction": "fraction of the layer backward passes skipped",
    }

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        model = super().apply(model, ctx)
        suffixes = self.config.sublayers or SUBLAYERS.get(ctx.architecture)
        if not suffixes:
            raise ValueError(f"dropbp: no default sublayers for architecture {ctx.architecture!r}; set `sublayers` "
                             f"(known defaults: {', '.join(SUBLAYERS)})")
        self.sublayers = [m for n, m in model.named_modules() if any(n.endswith("." + s) for s in suffixes)]
        if not self.sublayers:
            raise ValueError(f"dropbp: sublayers={suffixes} match no module of this {ctx.architecture} model")
        self.dropped: set[int] = set()
        self.generator = torch.Generator().manual_seed(ctx.seed)
        for i, m in enumerate(self.sublayers):
            m.register_forward_hook(self._hook(i))
        return model

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if module.training and i in self.dropped:
                return detach_output(output)  # eq. (2): forward unchanged, no backward through f
            return None
        return hook

    def on_train_begin(self, state: TrainState) -> None:
        self.n_dropped = self.n_total = 0

    def on_step_begin(self, state: TrainState) -> None:
        n = len(self.sublayers)
        drop = torch.rand(n, generator=self.generator) < self.config.drop_rate
        if bool(drop.all()):
            drop[int(torch.randint(n, (1,), generator=self.generator))] = False
        self.dropped = set(torch.nonzero(drop).flatten().tolist())
        self.n_dropped += len(self.dropped)
        self.n_total += n

    def on_train_end(self, state: TrainState) -> None:
        self.dropped = set()
        state.metrics["backward_dropped_fraction"] = round(self.n_dropped / max(1, self.n_total), 4)
