"""LoRAPrune: Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning (Zhang et al., arXiv 2305.18403).

Structured pruning of the frozen model while LoRA fine-tunes it, with importance estimated from
LoRA's own gradients so that the pre-trained weights never need a gradient (sec. 3.2): the
gradient of the merged weight W + s B A is approximated by s (∇B A + B ∇A), and a weight's
importance is |(W + s B A) ⊙ s (∇B A + B ∇A)| (eq. (8)), smoothed over steps by an EMA (eq. (9)).
A group's importance is the sum over its weights. Groups are the channels of the feed-forward
block (the rows of the MLP's input projections: Llama's gate_proj and up_proj share one
channel mask; BERT's intermediate.dense); the paper also prunes attention heads, which we do not.
Pruning is iterative (sec. 3.3): after each step in the pruning window the channels with the
lowest importance are masked, up to a sparsity that follows a cubic schedule to `sparsity`.
Masked channels output zero, so their rows of W + ΔW can be dropped from the merged model.
The record carries the achieved channel sparsity and the number of weights pruned.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState
from lorabench.methods.lora import LoRA, LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant

CHANNEL_GROUPS = {"llama": ["gate_proj", "up_proj"], "bert": ["intermediate.dense"]}


class ChannelMaskVariant(LoraVariant):
    """LoRA whose output channels can be masked: h = m ⊙ (W0 x + b + s B A x)."""

    def init(self, layer: LoraLinear) -> None:
        layer.register_buffer("channel_mask", torch.ones(layer.out_features, dtype=layer.lora_A.dtype,
                                                         device=layer.lora_A.device))

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        return super().forward(layer, x) * layer.channel_mask

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        # merged W' = m ⊙ (W0 + ΔW): the delta also zeroes the pruned rows of W0
        w = layer.base.weight
        return super().delta_weight(layer) * layer.channel_mask[:, None] - w * (1 - layer.channel_mask[:, None])

    def merge(self, layer: LoraLinear) -> None:
        super().merge(layer)
        if layer.base.bias is not None:
            layer.merged_bias = layer.base.bias.detach().clone()
            layer.base.bias.mul_(layer.channel_mask)

    def unmerge(self, layer: LoraLinear) -> None:
        super().unmerge(layer)
        if layer.base.bias is not None:
            layer.base.bias.copy_(layer.merged_bias)


def cubic_sparsity(step: int, start: int, end: int, final: float) -> float:
    """Sparsity after `step` steps: 0 before start, `final` from end on, cubic in between."""
    if step <= start:
        return 0.0
    if step >= end:
        return final
    return final * (1 - (1 - (step - start) / (end - start)) ** 3)


@dataclass
class LoraPruneConfig(LoraConfig):
    sparsity: float = option(0.2, "fraction of feed-forward channels pruned at the end", low=0.0, high=0.95)
    prune_start_ratio: float = option(0.1, "fraction of the steps before pruning starts", low=0.0, high=1.0)
    prune_end_ratio: float = option(0.7, "fraction of the steps by which the final sparsity is reached", low=0.0,
                                    high=1.0)
    ema: float = option(0.9, "EMA factor of the importance (eq. (9))", low=0.0, high=1.0)

    def __post_init__(self):
        super().__post_init__()
        if self.prune_start_ratio >= self.prune_end_ratio:
            raise ValueError("prune_start_ratio must be below prune_end_ratio")
        if self.kernel == "fused" or self.dropout > 0:
            raise ValueError("loraprune masks the layer output in its own forward: use kernel='reference', dropout=0")


class LoraPrune(LoRA):
    name = "loraprune"
    title = "LoRAPrune: Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning"
    paper = "2305.18403"
    family = "efficiency-pruning"
    config_cls = LoraPruneConfig
    mechanism_metrics = {
        "channel_sparsity": "fraction of the channel groups pruned by the LoRA-guided importance",
        "weights_pruned": "frozen weights removed with them",
    }

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        model = super().apply(model, ctx)
        suffixes = CHANNEL_GROUPS.get(ctx.architecture)
        if not suffixes:
            raise ValueError(f"loraprune knows the feed-forward channels of {', '.join(CHANNEL_GROUPS)}, "
                             f"not {ctx.architecture!r}")
        groups: dict[str, list[LoraLinear]] = defaultdict(list)
        for name, m in model.named_modules():
            for s in suffixes:
                if isinstance(m, LoraLinear) and name.endswith("." + s):
                    groups[name[: -len(s) - 1]].append(m)   # one block's gate/up share a channel mask
                    m.variant = ChannelMaskVariant()
                    m.variant.init(m)
        if not groups:
            raise ValueError(f"loraprune: no adapted feed-forward input projection ({', '.join(suffixes)}); "
                             "include them in target_modules")
        self.groups = list(groups.values())
        return model

    def on_train_begin(self, state: TrainState) -> None:
        self.importance: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def on_after_backward(self, state: TrainState) -> None:
        for g, layers in enumerate(self.groups):
            score = 0.0
            for m in layers:
                if m.lora_A.grad is None or m.lora_B.grad is None:
                    continue
                w = m.base.weight + m.scale * m.lora_B @ m.lora_A                       # W + s B A
                grad = m.scale * (m.lora_B.grad @ m.lora_A + m.lora_B @ m.lora_A.grad)   # LoRA-guided ∇W
                score = score + (w * grad).abs().sum(dim=1)                             # eq. (8), per channel
            if isinstance(score, torch.Tensor):
                prev = self.importance.get(g)
                self.importance[g] = score if prev is None else self.config.ema * prev + (1 - self.config.ema) * score

    @torch.no_grad()
    def on_step_end(self, state: TrainState) -> None:
        c, t = self.config, state.total_steps
        target = cubic_sparsity(state.step + 1, round(c.prune_start_ratio * t), round(c.prune_end_ratio * t), c.sparsity)
        if target > 0 and self.importance:
            self.prune_to(target)

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Mask the lowest-importance channels (over all groups) until `sparsity` of them are masked."""
        scores = []
        for g, layers in enumerate(self.groups):
            imp = self.importance.get(g, torch.zeros(layers[0].out_features))
            scores.append(imp.masked_fill(layers[0].channel_mask == 0, -1.0))  # already pruned: first in line
        flat = torch.cat(scores)
        k = int(sparsity * flat.numel())
        if k == 0:
            return
        cut = set(torch.topk(flat, k, largest=False).indices.tolist())
        offset = 0
        for layers, s in zip(self.groups, scores):
            idx = torch.tensor([i - offset for i in cut if offset <= i < offset + s.numel()], dtype=torch.long)
            for m in layers:
                m.channel_mask[idx] = 0
            offset += s.numel()

    def on_train_end(self, state: TrainState) -> None:
        masks = [layers[0].channel_mask for layers in self.groups]
        pruned = sum(int((mk == 0).sum()) for mk in masks)
        state.metrics["channel_sparsity"] = round(pruned / max(1, sum(mk.numel() for mk in masks)), 4)
        state.metrics["weights_pruned"] = sum(int((m.channel_mask == 0).sum()) * m.in_features
                                              for layers in self.groups for m in layers)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().adapter_state_dict(model)
        state.update({n: b.detach() for n, b in model.named_buffers() if n.endswith("channel_mask")})
        return state
