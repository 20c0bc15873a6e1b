"""LoRA+: LoRA with a larger learning rate for B than for A (Hayou et al., arXiv 2402.12354).

The adapter is LoRA's; only the optimizer changes: eta_B = lambda * eta_A with lambda >> 1
(sec. 4 of LoRA+, "setting eta_B = lambda eta_A with lambda > 1", recommended lambda = 2^4), which
the paper derives so that both factors learn efficiently in the infinite-width limit (Theorem 1).
Done through `param_groups`, as PEFT's `create_loraplus_optimizer`.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorabench.config import option
from lorabench.methods.lora import LoRA, LoraConfig


@dataclass
class LoraPlusConfig(LoraConfig):
    lr_ratio: float = option(16.0, "lambda = eta_B / eta_A (LoRA+ recommends 2^4)", low=1.0, high=1e4)


class LoRAPlus(LoRA):
    name = "lora-plus"
    title = "LoRA+: Efficient Low Rank Adaptation of Large Models"
    paper = "2402.12354"
    family = "learning-procedure"
    config_cls = LoraPlusConfig
    default_lr = 2e-4  # eta_A; B then learns at 16x this (LoRA+ sec. 5 tunes eta_A below LoRA's rate)
    mechanism_metrics = {
        "lr_ratio_B_to_A": "eta_B / eta_A as the optimizer holds it at the start of training (lambda)",
    }

    def on_train_begin(self, state) -> None:
        b_ids = {id(p) for n, p in self.trainable_parameters(state.model) if n.endswith("lora_B")}
        lr_b = [g["lr"] for g in state.optimizer.param_groups if any(id(p) in b_ids for p in g["params"])]
        lr_a = [g["lr"] for g in state.optimizer.param_groups if not any(id(p) in b_ids for p in g["params"])]
        if lr_a and lr_b and lr_a[0] > 0:
            state.metrics["lr_ratio_B_to_A"] = round(lr_b[0] / lr_a[0], 6)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        group_a, group_b = [], []
        for n, p in self.trainable_parameters(model):
            (group_b if n.endswith("lora_B") else group_a).append(p)  # everything but B keeps eta_A, as PEFT
        groups = [{"params": group_a, "lr": lr, "weight_decay": weight_decay},
                  {"params": group_b, "lr": lr * self.config.lr_ratio, "weight_decay": weight_decay}]  # eta_B
        return [g for g in groups if g["params"]]
