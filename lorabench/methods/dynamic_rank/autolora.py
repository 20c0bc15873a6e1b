"""AutoLoRA: automatically tuning matrix ranks in low-rank adaptation based on meta learning
(Zhang et al., arXiv 2403.09113).

The update is a weighted sum of rank-1 matrices, ΔW = s Σ_j α_j b_j a_jᵀ = s B diag(α) A
(eq. (1)), with selection variables α = softmax(logits) per layer (α_j in [0, 1], summing to 1).
During the search phase, B and A learn on training batches and α on validation batches
(meta learning, first-order alternation; see bilevel.py for the split). At the end of the search
the rank of each layer is fixed by thresholding (sec. 3.3): components with α_j < threshold are
removed (masked to zero) and α is frozen; B and A then keep training on every batch. The record
carries the mean and the spread of the ranks found.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.lora import LoRA, LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant
from lorabench.methods.learning_procedure.bilevel import is_upper_step, keep_gradients


class SelectionVariant(LoraVariant):
    """ΔW = s B diag(α ⊙ mask) A with α = softmax(lora_alpha_logits)."""

    def init(self, layer: LoraLinear) -> None:
        like = layer.lora_A
        layer.lora_alpha_logits = nn.Parameter(torch.zeros(layer.rank, dtype=like.dtype, device=like.device))
        layer.register_buffer("rank_mask", torch.ones(layer.rank, dtype=like.dtype, device=like.device))

    @staticmethod
    def alpha(layer: LoraLinear) -> torch.Tensor:
        return layer.lora_alpha_logits.softmax(-1) * layer.rank_mask

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return layer.scale * (layer.lora_B * self.alpha(layer)) @ layer.lora_A

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
        return layer.base(x) + ((h @ layer.lora_A.T) * self.alpha(layer)) @ layer.lora_B.T * layer.scale


@dataclass
class AutoLoraConfig(LoraConfig):
    search_ratio: float = option(0.5, "fraction of the steps spent searching the ranks (learning α)", low=0.0, high=1.0)
    upper_every: int = option(5, "during the search, every this many-th batch is a validation batch that trains "
                                 "only α", low=2)
    threshold: float | None = option(None, "keep components with α_j >= threshold; None = 1/r, the uniform "
                                           "weight (keep what the search raised above uniform)", low=0.0, high=1.0)

    def __post_init__(self):
        super().__post_init__()
        if self.kernel == "fused":
            raise ValueError("autolora has its own forward (selection weights): use kernel='reference'")


class AutoLoRA(LoRA):
    name = "autolora"
    title = "AutoLoRA: Automatically Tuning Matrix Ranks in Low-Rank Adaptation Based on Meta Learning"
    paper = "2403.09113"
    family = "dynamic-rank"
    config_cls = AutoLoraConfig
    mechanism_metrics = {
        "rank_mean": "mean rank kept per layer after the search (selection weights α above the threshold)",
        "rank_min": "smallest rank kept by a layer",
        "rank_max": "largest rank kept by a layer",
    }

    def variant(self) -> LoraVariant:
        return SelectionVariant()

    def on_train_begin(self, state: TrainState) -> None:
        self.search_steps = int(round(self.config.search_ratio * state.total_steps))
        self.searching = self.search_steps > 0

    def on_after_backward(self, state: TrainState) -> None:
        trainable = [p for _, p in self.trainable_parameters(state.model)]
        alphas = {id(m.lora_alpha_logits) for m in self.lora_layers(state.model)}
        if self.searching and is_upper_step(state.step, self.config.upper_every):
            keep_gradients(trainable, alphas)                                  # α on validation batches
        else:
            keep_gradients(trainable, {id(p) for p in trainable} - alphas)     # B, A (and head) on training batches

    def on_step_end(self, state: TrainState) -> None:
        if self.searching and state.step + 1 == self.search_steps:
            self.fix_ranks(state.model, state.metrics)

    @torch.no_grad()
    def fix_ranks(self, model: nn.Module, metrics: dict) -> None:
        ranks = []
        for m in self.lora_layers(model):
            a = m.lora_alpha_logits.softmax(-1)
            thr = self.config.threshold if self.config.threshold is not None else 1.0 / m.rank
            keep = a >= thr - 1e-12
            if not keep.any():
                keep[int(a.argmax())] = True   # a layer keeps at least its strongest component
            m.rank_mask.copy_(keep.to(m.rank_mask.dtype))
            m.lora_alpha_logits.requires_grad_(False)   # the search is over: α is fixed
            ranks.append(int(keep.sum()))
        self.searching = False
        metrics["rank_mean"] = round(sum(ranks) / max(1, len(ranks)), 3)
        metrics["rank_min"], metrics["rank_max"] = min(ranks, default=0), max(ranks, default=0)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().adapter_state_dict(model)
        state.update({n: b.detach() for n, b in model.named_buffers() if n.endswith("rank_mask")})
        return state
