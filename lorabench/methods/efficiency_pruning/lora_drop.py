"""LoRA-Drop: Efficient LoRA Parameter Pruning based on Output Evaluation (Zhou et al., arXiv 2402.07721).

Two phases (sec. 3). First, LoRA is trained on every target for a fraction of the steps while
each layer's importance is measured from its output: I_i = mean over tokens of ||ΔW_i x||²
(eq. (2)), normalised to sum to one. Then layers are sorted by importance and the most important
ones whose cumulative importance reaches `keep_ratio` keep their own LoRA; every other layer
shares a single LoRA per weight shape (eq. (3)), here the one of the most important pruned layer
of that shape. Sharing is kept by tying, not aliasing: a member's gradient is added to its owner's
and the owner's values are copied back after each step, so every layer keeps its own named tensor
(the optimizer needs no new parameter group and the adapter file stays one tensor per layer).
Training then continues. The record carries the fraction of layers kept and the adapter parameters after
pruning.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.lora import LoRA, LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant


class OutputNormVariant(LoraVariant):
    """Plain LoRA that also accumulates ||ΔW x||² of its training forwards (eq. (2))."""

    def init(self, layer: LoraLinear) -> None:
        layer.importance_sum, layer.importance_count = 0.0, 0

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
        delta = F.linear(F.linear(h, layer.lora_A), layer.lora_B) * layer.scale
        if layer.training and layer.measure:
            with torch.no_grad():
                sq = delta.pow(2).sum(-1)                      # ||ΔW x||² per token
                layer.importance_sum += float(sq.sum())
                layer.importance_count += sq.numel()
        return layer.base(x) + delta


@dataclass
class LoraDropConfig(LoraConfig):
    sample_ratio: float = option(0.1, "fraction of the training steps in which importance is measured before "
                                      "pruning (the paper trains on a sampled subset first)", low=0.0, high=1.0)
    keep_ratio: float = option(0.9, "keep own LoRAs for the most important layers up to this cumulative importance "
                                    "(the paper's threshold T, 0.9)", low=0.0, high=1.0)

    def __post_init__(self):
        super().__post_init__()
        if self.kernel == "fused":
            raise ValueError("lora-drop measures its LoRA outputs in its own forward: use kernel='reference'")


class LoraDrop(LoRA):
    name = "lora-drop"
    title = "LoRA-Drop: Efficient LoRA Parameter Pruning based on Output Evaluation"
    paper = "2402.07721"
    family = "efficiency-pruning"
    config_cls = LoraDropConfig
    mechanism_metrics = {
        "kept_layer_fraction": "fraction of the adapted layers that keep their own LoRA (the others share one)",
        "adapter_params_after_pruning": "distinct adapter parameters after sharing",
        "pruned_at_step": "the step after which importance was read and layers pruned",
    }

    def variant(self) -> LoraVariant:
        return OutputNormVariant()

    def make_layer(self, base: nn.Linear) -> nn.Module:
        layer = super().make_layer(base)
        layer.measure = True
        return layer

    def on_train_begin(self, state: TrainState) -> None:
        # B = 0 at init, so the first step's outputs ΔW x are all zero: importance needs at least one
        # forward after an update (at 10 steps, 0.1 of them measured nothing and every layer was kept)
        self.prune_at = max(2, int(round(self.config.sample_ratio * state.total_steps)))
        if self.prune_at >= state.total_steps:
            raise ValueError(f"lora-drop measures importance for {self.prune_at} steps (at least 2: B starts at "
                             f"zero) and then trains the pruned adapter: a budget of {state.total_steps} steps "
                             f"leaves no step after pruning; train longer or lower sample_ratio")
        self.pruned = False
        self.ties: list[tuple[LoraLinear, list[LoraLinear]]] = []

    def on_step_end(self, state: TrainState) -> None:
        if not self.pruned and state.step + 1 == self.prune_at:
            self.prune(state.model, state.metrics)
        self.sync()

    def importance(self, model: nn.Module) -> dict[str, float]:
        raw = {n: m.importance_sum / max(1, m.importance_count) for n, m in model.named_modules()
               if isinstance(m, LoraLinear)}
        total = sum(raw.values()) or 1.0
        return {n: v / total for n, v in raw.items()}               # normalised importance

    def prune(self, model: nn.Module, metrics: dict) -> None:
        imp = self.importance(model)
        assert any(imp.values()), "lora-drop measured no output of any LoRA layer (ΔW x = 0 everywhere)"
        layers = dict((n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear))
        order = sorted(imp, key=imp.get, reverse=True)
        kept, cum = [], 0.0
        for n in order:
            if cum >= self.config.keep_ratio:
                break
            kept.append(n)
            cum += imp[n]
        groups = defaultdict(list)
        for n in order:  # most important first: the first pruned layer of a shape lends its LoRA
            if n not in kept:
                groups[(layers[n].in_features, layers[n].out_features)].append(layers[n])
        self.ties = [(members[0], members[1:]) for members in groups.values() if len(members) > 1]
        self.sync()
        for m in layers.values():
            m.measure = False
        self.pruned = True
        tied = {id(m) for _, members in self.ties for m in members}
        unique = {id(m): m.lora_A.numel() + m.lora_B.numel() for m in layers.values() if id(m) not in tied}
        metrics["kept_layer_fraction"] = round(len(kept) / max(1, len(layers)), 4)
        metrics["pruned_at_step"] = self.prune_at
        metrics["adapter_params_after_pruning"] = int(sum(unique.values()))

    @torch.no_grad()
    def sync(self) -> None:
        for owner, members in self.ties:
            for m in members:
                m.lora_A.copy_(owner.lora_A)
                m.lora_B.copy_(owner.lora_B)

    def on_after_backward(self, state: TrainState) -> None:
        for owner, members in self.ties:   # the shared LoRA's gradient: the sum over the layers using it
            for m in members:
                for own, p in ((owner.lora_A, m.lora_A), (owner.lora_B, m.lora_B)):
                    if p.grad is not None:
                        own.grad = p.grad if own.grad is None else own.grad + p.grad
                    p.grad = None
