"""LoRA with layer pruning: Parameter-Efficient Fine-Tuning with Layer Pruning on Free-Text
Sequence-to-Sequence Modeling (Zhu et al., arXiv 2305.08285).

The paper removes transformer layers before fine-tuning with LoRA and finds that a large part of
the layers can go at little cost in quality, with fewer parameters and faster training and
inference. lorabench's models are a single stack (encoder-only BERT, decoder-only Llama), so the
layers are removed from that stack: `which: top` drops the last ones, `alternate` every other one
from the top. The remaining layers are re-indexed (their KV-cache slots) and the model config's
`num_hidden_layers` updated; LoRA is then applied to what is left. The pruned model is rebuilt
from the same base when an adapter is loaded, so the adapter holds only LoRA and head tensors.
The record carries the layers kept and the backbone parameters removed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState
from lorabench.methods.lora import LoRA, LoraConfig


STACKS = ("model.layers", "bert.encoder.layer", "encoder.layer", "layers")


def stack_path(model: nn.Module) -> str:
    for path in STACKS:
        try:
            stack = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(stack, nn.ModuleList):
            return path
    raise ValueError("lora-layer-pruning: no transformer layer list found (looked for model.layers, "
                     "bert.encoder.layer, encoder.layer, layers)")


def layer_stack(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(stack_path(model))


def layers_to_keep(n: int, prune_ratio: float, which: str) -> list[int]:
    # a positive ratio removes at least one layer: round(0.25 * 2) = 0 would leave plain LoRA
    n_drop = min(n - 1, max(1 if prune_ratio > 0 else 0, int(round(prune_ratio * n))))
    if prune_ratio > 0 and n_drop == 0:
        raise ValueError(f"lora-layer-pruning: a model with {n} transformer layer cannot lose one (at least one "
                         f"stays); use prune_ratio=0 or a deeper model")
    if which == "top":
        return list(range(n - n_drop))
    dropped = set(range(n - 1, -1, -2)[:n_drop])   # every other layer, from the top down
    return [i for i in range(n) if i not in dropped]


@dataclass
class LayerPruningConfig(LoraConfig):
    prune_ratio: float = option(0.25, "fraction of the transformer layers removed (at least one layer stays)",
                                low=0.0, high=0.95)
    which: Literal["top", "alternate"] = option("top", "which layers go: 'top' (the last ones) or 'alternate' "
                                                       "(every other one, from the top down)")


class LayerPruningLoRA(LoRA):
    name = "lora-layer-pruning"
    title = "Parameter-Efficient Fine-Tuning with Layer Pruning on Free-Text Sequence-to-Sequence Modeling"
    paper = "2305.08285"
    family = "efficiency-pruning"
    config_cls = LayerPruningConfig
    mechanism_metrics = {
        "layers_kept": "transformer layers left after pruning",
        "layers_before": "transformer layers of the model before pruning",
        "backbone_params_removed": "backbone parameters removed with the pruned layers",
    }

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        stack = layer_stack(model)
        before = sum(p.numel() for p in model.parameters())
        keep = layers_to_keep(len(stack), self.config.prune_ratio, self.config.which)
        kept = [stack[i] for i in keep]
        self.n_layers, self.n_kept = len(stack), len(kept)
        parent, _, child = stack_path(model).rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.ModuleList(kept))  # the others are gone
        for new_index, layer in enumerate(kept):
            for m in layer.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = new_index   # its KV-cache slot
        model.config.num_hidden_layers = len(kept)
        self.params_removed = before - sum(p.numel() for p in model.parameters())
        return super().apply(model, ctx)

    def on_train_begin(self, state: TrainState) -> None:
        state.metrics["layers_kept"] = self.n_kept
        state.metrics["layers_before"] = self.n_layers
        state.metrics["backbone_params_removed"] = self.params_removed
