"""Init[B] of "The Impact of Initialization on LoRA Finetuning Dynamics" (Hayou, Ghosh, Yu,
arXiv 2406.08447), as its own registered row so that the board compares it with LoRA (Init[A]).

LoRA needs B A = 0 at step 0, so one factor starts at zero. LoRA (arXiv 2106.09685) draws A at
random and sets B = 0: the paper's Init[A]. Init[B] does the opposite, B random and A = 0
(sec. 3 of arXiv 2406.08447). Its large-width analysis (sec. 3, Theorems 1-2) finds that Init[A]
admits a larger learning rate (Θ(n^{-1/2}) against Θ(n^{-1}) before feature updates blow up) and so
learns features more efficiently, while Init[B] is more stable but under-learns: after the same
steps at the same learning rate its update is smaller. Only the initialisation differs, so this
is `LoRA` with `zero_init='A'`; the rest is eq. (3) of LoRA.

Mechanism metrics (in the record's method_metrics, over the adapted layers, after training):
`zero_factor_norm` (the mean ||A||_F, which started at 0), `random_factor_rel_change` (mean
||B - B_0||_F / ||B_0||_F) and `delta_w_norm` (mean ||s B A||_F, the learnt update).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.lora import LoRA, LoraConfig, LoraLinear


@dataclass
class LoraInitBConfig(LoraConfig):
    zero_init: Literal["A"] = option(
        "A", "the factor that starts at zero: always 'A' here (Init[B] of arXiv 2406.08447: B random, A = 0); "
             "LoRA's own choice, Init[A], is the method 'lora'")


class LoRAInitB(LoRA):
    name = "lora-init-b"
    title = "The Impact of Initialization on LoRA Finetuning Dynamics"
    paper = "2406.08447"
    family = "learning-procedure"
    config_cls = LoraInitBConfig
    default_lr = 5e-4  # LoRA's: the comparison of Init[A] and Init[B] is at equal learning rate (sec. 4)
    mechanism_metrics = {
        "zero_factor_norm": "mean ||A||_F over the adapted layers after training (A starts at 0 under Init[B])",
        "random_factor_rel_change": "mean ||B - B_0||_F / ||B_0||_F: how far the random factor B moved from its init",
        "delta_w_norm": "mean ||s B A||_F, the learnt update",
    }

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.zero_init != "A":
            raise ValueError(f"lora-init-b is Init[B]: zero_init must be 'A' (got {self.config.zero_init!r}); "
                             f"for Init[A] (B = 0) use the method 'lora'")
        self._b0: dict[int, torch.Tensor] = {}

    def on_train_begin(self, state: TrainState) -> None:
        self._b0 = {id(m): m.lora_B.detach().clone() for m in self.lora_layers(state.model)}

    @torch.no_grad()
    def on_train_end(self, state: TrainState) -> None:
        layers: list[LoraLinear] = self.lora_layers(state.model)
        a = [m.lora_A.float().norm().item() for m in layers]
        change = [((m.lora_B - self._b0[id(m)]).float().norm() / self._b0[id(m)].float().norm()).item()
                  for m in layers if id(m) in self._b0]
        dw = [m.delta_weight().float().norm().item() for m in layers]
        state.metrics["zero_factor_norm"] = sum(a) / len(a)
        if change:
            state.metrics["random_factor_rel_change"] = sum(change) / len(change)
        state.metrics["delta_w_norm"] = sum(dw) / len(dw)
