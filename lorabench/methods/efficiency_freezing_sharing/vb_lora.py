"""VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks (Li et al., arXiv 2405.15179).

Every sub-vector (length b) of every LoRA factor of every layer is a top-k mixture of the vectors of
one bank B = {β_1..β_h} shared by the whole model (sec. 3.2):

  v = Σ_{i in top-k(σ)} softmax(σ_topk)_i β_i                      (eq. (3) of VB-LoRA)
  A (r, k) = k/b sub-vectors per row, B (d, r) = d/b sub-vectors per column, h = W0 x + B A x

Trained: the bank (uniform in ±bound at init) and the logits σ (N(0, std)). The update is not
zero at init (as in the paper and PEFT). Equal to PEFT's VBLoRA on the same bank and logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, DeltaLayer, Method, MethodConfig, replace_module, resolve_targets


@dataclass
class VBLoraConfig(MethodConfig):
    rank: int = option(4, "rank r of the composed factors (VB-LoRA: 4)", low=1, high=4096)
    num_vectors: int = option(256, "h, vectors in the shared bank", low=1)
    vector_length: int = option(64, "b, length of each bank vector; must divide every adapted in/out size (the paper's "
                                    "256 suits Llama's 4096; 64 divides MiniLM's 384/1536 and SmolLM2's 576/1536)", low=1)
    topk: int = option(2, "k of the top-k mixture (eq. (3); VB-LoRA: 2)", low=1)
    init_bank_bound: float = option(0.02, "the bank starts uniform in [-bound, bound]", low=0.0)
    init_logits_std: float = option(0.1, "the logits start as N(0, std)", low=0.0)
    dropout: float = option(0.0, "dropout on the input of the adapter path", low=0.0, high=0.99)

    def __post_init__(self):
        if self.topk > self.num_vectors:
            raise ValueError(f"topk {self.topk} exceeds num_vectors {self.num_vectors}")


def mix(logits: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """eq. (3): softmax over the top-k logits, weighted sum of the chosen bank vectors. (..., b)"""
    top, idx = logits.topk(k, dim=-1)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[idx]).sum(-2)


class VBLoraLinear(DeltaLayer):
    def __init__(self, base: nn.Linear, bank: nn.Parameter, rank: int, topk: int, logits_std: float, dropout: float):
        super().__init__()
        b = bank.shape[1]
        if base.in_features % b or base.out_features % b:
            raise ValueError(f"vector_length {b} must divide in_features {base.in_features} and out_features "
                             f"{base.out_features}; choose a common divisor")
        self.base, self.bank = base, bank  # the bank is shared: the same Parameter in every layer
        self.in_features, self.out_features = base.in_features, base.out_features
        h = bank.shape[0]
        self.vblora_logits_A = nn.Parameter(torch.randn(rank, self.in_features // b, h) * logits_std)
        self.vblora_logits_B = nn.Parameter(torch.randn(self.out_features // b, rank, h) * logits_std)
        self.topk, self.dropout_p, self.merged = topk, dropout, False

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        A = mix(self.vblora_logits_A, self.bank, self.topk).reshape(self.vblora_logits_A.shape[0], -1)  # (r, k)
        B = mix(self.vblora_logits_B, self.bank, self.topk).transpose(1, 2).reshape(-1, self.vblora_logits_B.shape[1])  # (d, r)
        return A, B

    def delta_weight(self) -> torch.Tensor:
        A, B = self.factors()
        return B @ A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        A, B = self.factors()
        h = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        return self.base(x) + F.linear(F.linear(h, A), B)


class VBLoRA(Method):
    name = "vb-lora"
    title = "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks"
    paper = "2405.15179"
    family = "efficiency-freezing-sharing"
    config_cls = VBLoraConfig
    default_lr = 1e-2  # VB-LoRA trains the bank and logits at 1e-3..1e-2 (logits faster in the paper)
    mergeable = True
    layer_type = VBLoraLinear

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        self.freeze_all_but_head(model, ctx)
        c = self.config
        names = resolve_targets(model, c.target_modules, ctx)
        w = model.get_submodule(names[0]).weight
        bank = nn.Parameter(torch.empty(c.num_vectors, c.vector_length, dtype=w.dtype, device=w.device)
                            .uniform_(-c.init_bank_bound, c.init_bank_bound))
        for name in names:
            replace_module(model, name, VBLoraLinear(model.get_submodule(name), bank, c.rank, c.topk,
                                                     c.init_logits_std, c.dropout))
        return model

