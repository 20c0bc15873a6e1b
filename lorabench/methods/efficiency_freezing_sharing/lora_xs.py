"""LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters (Bałazy et al., arXiv 2405.17604).

The factors come from the truncated SVD of the pretrained weight, W ≈ U_r Σ_r V_r^T, and are
frozen: B = U_r Σ_r (d, r), A = V_r^T (r, k). Only a small r x r matrix R between them is trained
(sec. 3, eq. (2) of LoRA-XS):

  h = W0 x + s B R A x

so the trained parameters per layer are r^2, independent of the layer's width. R starts at zero
(the update is zero at step 0; `r_init_std` > 0 gives the paper's small Gaussian init instead).
A and B are rebuilt from W when the adapter is loaded: the adapter stores only R.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.lora import LoRA, LoraConfig, LoraLinear, LoraVariant


@dataclass
class LoraXSConfig(LoraConfig):
    alpha: float = option(8.0, "scale numerator (scale alpha / r); LoRA-XS uses alpha = r (scale 1)", low=0.0)
    r_init_std: float = option(0.0, "standard deviation of R's Gaussian init (0 = start at zero, ΔW = 0)", low=0.0)


class LoraXSVariant(LoraVariant):
    def __init__(self, r_init_std: float):
        self.r_init_std = r_init_std

    @torch.no_grad()
    def init(self, layer: LoraLinear) -> None:
        w = layer.base.weight.float()
        r = layer.rank
        if r > min(w.shape):
            raise ValueError(f"rank {r} exceeds min(out, in) = {min(w.shape)} of a {tuple(w.shape)} layer")
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        layer.lora_B.copy_(U[:, :r] * S[:r])  # B = U_r Σ_r, frozen
        layer.lora_A.copy_(Vh[:r])  # A = V_r^T, frozen
        R = torch.randn(r, r) * self.r_init_std if self.r_init_std > 0 else torch.zeros(r, r)
        layer.lora_R = nn.Parameter(R.to(layer.lora_A.dtype).to(layer.lora_A.device))  # trained, (r, r)

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
        # eq. (2): W0 x + s B R A x
        return layer.base(x) + F.linear(F.linear(F.linear(h, layer.lora_A), layer.lora_R), layer.lora_B) * layer.scale

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return layer.scale * (layer.lora_B @ layer.lora_R @ layer.lora_A)


class LoRAXS(LoRA):
    name = "lora-xs"
    title = "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters"
    paper = "2405.17604"
    family = "efficiency-freezing-sharing"
    config_cls = LoraXSConfig
    default_lr = 1e-3  # r^2 parameters per layer: LoRA-XS trains with larger rates than LoRA

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.zero_init != "B":
            raise ValueError("lora-xs builds A and B from the SVD; zero_init does not apply, leave it at 'B'")

    def variant(self) -> LoraVariant:
        return LoraXSVariant(self.config.r_init_std)

    def freeze_adapter(self, layer: LoraLinear) -> None:
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # A, B are the SVD of the base weight, rebuilt by apply(): store only R (and the task head)
        return {n: p.detach() for n, p in self.trainable_parameters(model)}
