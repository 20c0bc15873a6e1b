"""Delta-LoRA: fine-tuning high-rank parameters with the delta of low-rank matrices
(Zi et al., arXiv 2309.02411).

After the optimizer updates A and B, the frozen weight also moves by the change of their
product (eq. (8) of the paper): W <- W + lambda * s * (B' A' - B A), from step K on. This costs no
gradient or optimizer state for W. The paper also removes dropout from the low-rank path, which
makes (B' A' - B A) a surrogate of W's own gradient step (sec. 4.2); our default dropout is 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.low_rank_bottleneck.layer import HighRankLoRA, high_rank_layers
from lorabench.methods.lora import LoRA, LoraConfig


@dataclass
class DeltaLoraConfig(LoraConfig):
    delta_lambda: float = option(2.0, "lambda of eq. (8): the weight moves by lambda times the change of s B A "
                                      "(the paper's default is 2)", low=0.0)
    update_start_ratio: float = option(
        0.1, "fraction of the steps trained as plain LoRA before W starts moving (the paper's K=500 warm "
             "phase: the early product changes are noisy)", low=0.0, high=1.0)

    def __post_init__(self):
        super().__post_init__()
        if self.dropout > 0:
            raise ValueError("Delta-LoRA removes dropout from the low-rank path (sec. 4.2): use dropout=0")


class DeltaLoRA(HighRankLoRA, LoRA):
    name = "delta-lora"
    title = "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank Matrices"
    paper = "2309.02411"
    family = "low-rank-bottleneck"
    config_cls = DeltaLoraConfig
    mechanism_metrics = {
        "weight_update_steps": "steps whose delta of B A was also added to W (eq. (8))",
        "update_rank_mean": "mean numerical rank of the whole update W - W0 over the layers",
    }

    def on_train_begin(self, state: TrainState) -> None:
        self.start = int(round(self.config.update_start_ratio * state.total_steps))
        self.before: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def on_after_backward(self, state: TrainState) -> None:
        if state.step >= self.start:  # snapshot (A, B) before the optimizer step
            self.before = [(m.lora_A.detach().clone(), m.lora_B.detach().clone())
                           for m in high_rank_layers(state.model)]

    @torch.no_grad()
    def on_step_end(self, state: TrainState) -> None:
        if self.before is None:
            return
        lam = self.config.delta_lambda
        for m, (a, b) in zip(high_rank_layers(state.model), self.before):
            m.weight_delta += lam * m.scale * (m.lora_B @ m.lora_A - b @ a)  # eq. (8)
        self.before = None

    def on_train_end(self, state: TrainState) -> None:
        state.metrics["weight_update_steps"] = max(0, state.total_steps - self.start)
        self.report_rank(state)
