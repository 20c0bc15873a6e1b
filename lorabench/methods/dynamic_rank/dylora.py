"""DyLoRA: dynamic search-free low-rank adaptation (Valipour et al., arXiv 2210.07558).

LoRA trained for every rank b <= r at once: at each step a rank b ~ p_B = U{1..r} is sampled (one
for the whole model), the forward uses the truncated factors A_{1:b}, B_{:,1:b} scaled by alpha / b
(eq. (3) of DyLoRA), and only the b-th row of A and column of B are updated (eqs. (5)-(6), the
paper's "frozen" mode: the lower ranks were trained when they were sampled; the gradients of the
other rows are zeroed, so with AdamW only their momentum from earlier steps still moves them). Afterwards the adapter
works at any rank b without retraining; `eval_rank` picks the one used for evaluation and merging.
Rank sampling and the gradient mask run in the `on_step_begin` / `on_after_backward` hooks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState
from lorabench.methods.lora import LoRA, LoraConfig, LoraLinear, LoraVariant


@dataclass
class DyLoraConfig(LoraConfig):
    eval_rank: int | None = option(None, "rank b used outside training (evaluation, merge); None = the full rank r",
                                   low=1)
    update_all_ranks: bool = option(False, "update every row up to b, not only the b-th (DyLoRA's non-frozen mode)")

    def __post_init__(self):
        super().__post_init__()
        if self.eval_rank is not None and self.eval_rank > self.rank:
            raise ValueError(f"eval_rank {self.eval_rank} exceeds rank {self.rank}")


class TruncatedVariant(LoraVariant):
    """eq. (3): W0 x + (alpha / b) B_{:,1:b} A_{1:b} x with b = layer.active_rank."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        b = layer.active_rank
        h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
        return layer.base(x) + F.linear(F.linear(h, layer.lora_A[:b]), layer.lora_B[:, :b]) * (self.alpha / b)

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        b = layer.active_rank
        return (self.alpha / b) * (layer.lora_B[:, :b] @ layer.lora_A[:b])


class DyLoRA(LoRA):
    name = "dylora"
    title = "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation"
    paper = "2210.07558"
    family = "dynamic-rank"
    config_cls = DyLoraConfig
    mechanism_metrics = {
        "dylora_sampled_ranks": "the rank b ~ U{1..r} sampled at every step",
    }
    default_lr = 5e-4

    def variant(self) -> LoraVariant:
        return TruncatedVariant(self.config.alpha)

    def eval_rank(self) -> int:
        return self.config.eval_rank or self.config.rank

    def apply(self, model, ctx: ApplyContext):
        model = super().apply(model, ctx)
        self.set_rank(model, self.eval_rank())
        self.generator = torch.Generator().manual_seed(ctx.seed)
        return model

    def set_rank(self, model, b: int) -> None:
        for layer in self.lora_layers(model):
            layer.active_rank = b

    def on_step_begin(self, state: TrainState) -> None:
        b = int(torch.randint(1, self.config.rank + 1, (1,), generator=self.generator))  # b ~ U{1..r}
        self.sampled = b
        self.set_rank(state.model, b)
        state.metrics.setdefault("dylora_sampled_ranks", []).append(b)

    def on_after_backward(self, state: TrainState) -> None:
        if self.config.update_all_ranks:
            return
        b = self.sampled
        for layer in self.lora_layers(state.model):  # eqs. (5)-(6): only the b-th row/column learns
            if layer.lora_A.grad is not None:
                layer.lora_A.grad[: b - 1].zero_()
            if layer.lora_B.grad is not None:
                layer.lora_B.grad[:, : b - 1].zero_()

    def on_train_end(self, state: TrainState) -> None:
        self.set_rank(state.model, self.eval_rank())
