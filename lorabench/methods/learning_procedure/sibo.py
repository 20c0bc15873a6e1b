"""SIBO: A Simple Booster for Parameter-Efficient Fine-Tuning (Wen, Zhang, Fang, arXiv 2402.11896).

Deep transformers over-smooth: token representations grow alike with depth. SIBO injects the
initial residual, the token's representation at the model's input h0 (the embedding output),
into the input of every LoRA of the transformer blocks whose input lives in the hidden space
(sec. 3, LoRA-SIBO):
h = W0 x + s B A ((1 - lambda) x + lambda h0), so each adapted layer keeps at least a fraction
lambda of the input features (the initial-residual form of GCNII that SIBO adopts). Layers
whose input is not hidden-sized (an MLP's down projection) are plain LoRA. The update depends
on h0, so it does not merge into W0.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState
from lorabench.methods.lora import LoRA, LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant


class InitialResidual:
    """Holds h0 of the current forward pass, captured by a hook on the input embeddings."""

    def __init__(self):
        self.h0: torch.Tensor | None = None

    def hook(self, module, inputs, output):
        self.h0 = output


class SiboVariant(LoraVariant):
    def __init__(self, holder: InitialResidual, lam: float):
        self.holder, self.lam = holder, lam

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        h0 = self.holder.h0
        if h0 is None or h0.shape != x.shape:
            raise RuntimeError(f"sibo: no initial residual of shape {tuple(x.shape)} for this forward pass; "
                               "the layer must be called inside the model's forward")
        h = (1.0 - self.lam) * x + self.lam * h0.to(x.dtype)  # initial residual injection
        return layer.base(x) + (h @ layer.lora_A.T @ layer.lora_B.T) * layer.scale


@dataclass
class SiboConfig(LoraConfig):
    lam: float = option(0.2, "lambda: the fraction of the initial residual h0 mixed into the LoRA input "
                             "(the paper tunes it in 0.1-0.5)", low=0.0, high=1.0)

    def __post_init__(self):
        super().__post_init__()
        if self.dropout > 0 or self.kernel == "fused":
            raise ValueError("sibo has its own LoRA input: use dropout=0 and kernel='reference'")


BLOCK = re.compile(r"\.layers?\.\d+\.")  # a module inside transformer block i


class SIBO(LoRA):
    name = "sibo"
    title = "SIBO: A Simple Booster for Parameter-Efficient Fine-Tuning"
    paper = "2402.11896"
    family = "learning-procedure"
    config_cls = SiboConfig
    mechanism_metrics = {
        "residual_layers": "adapted layers whose LoRA input mixes in the initial residual h0",
    }
    mergeable = False

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        emb = model.get_input_embeddings()
        self.holder = InitialResidual()
        # BERT: h0 is the embeddings block's output (word + position + type, normalised); Llama: the token embedding.
        source = model.get_submodule("bert.embeddings") if ctx.architecture == "bert" and hasattr(model, "bert") else emb
        source.register_forward_hook(self.holder.hook)
        model = super().apply(model, ctx)
        for name, layer in model.named_modules():
            # inside the transformer blocks (not BERT's pooler, which sees one token) and hidden-sized input only
            if isinstance(layer, LoraLinear) and BLOCK.search(name) and layer.in_features == emb.embedding_dim:
                layer.variant = SiboVariant(self.holder, self.config.lam)
        return model

    def on_train_end(self, state: TrainState) -> None:
        state.metrics["residual_layers"] = sum(isinstance(m, LoraLinear) and isinstance(m.variant, SiboVariant)
                                               for m in state.model.modules())

    def merge(self, model: nn.Module) -> None:
        raise NotImplementedError("sibo's update depends on the initial residual h0: it cannot be merged into W0")

    unmerge = merge
