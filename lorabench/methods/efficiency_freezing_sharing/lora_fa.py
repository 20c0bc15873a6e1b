"""LoRA-FA: memory-efficient LoRA with A frozen (Zhang et al., arXiv 2308.03303).

A is randomly initialised and frozen, only B is trained (sec. 3 of LoRA-FA): ΔW = s B A with
A fixed, so backpropagation needs only the r-dimensional activations A x, not x itself — the
activation memory of the adapter drops by a factor in/r. The frozen A is saved with the adapter.
"""
from __future__ import annotations

from lorabench.methods.lora import LoRA, LoraLinear


class LoRAFA(LoRA):
    name = "lora-fa"
    title = "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning"
    paper = "2308.03303"
    family = "efficiency-freezing-sharing"
    default_lr = 1e-3  # half the trained parameters: a larger rate than LoRA's

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.zero_init != "B":
            raise ValueError("lora-fa freezes A, so A must be the random factor: zero_init must be 'B'")

    def freeze_adapter(self, layer: LoraLinear) -> None:
        layer.lora_A.requires_grad_(False)  # sec. 3 of LoRA-FA: A frozen after random init, only B trained
