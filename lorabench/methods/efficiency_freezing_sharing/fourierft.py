"""FourierFT: Parameter-Efficient Fine-Tuning with Discrete Fourier Transform (Gao et al., arXiv 2405.03003).

ΔW is learned in the frequency domain: n spectral coefficients c at fixed random entries E of a
d x k spectrum F (the same entry positions for every layer, drawn from a seeded generator, sec. 3.1),
and the weight update is the real part of the inverse 2-D DFT, scaled by alpha:

  F = TOSPARSE(c, E),  ΔW = alpha * Re(IDFT2(F))   (eqs. (2)-(3) of FourierFT)
  h = W0 x + ΔW x                                    (eq. (4))

c is drawn from N(0, 1) as in the paper and PEFT's default (`init_zero=true` starts from ΔW = 0).
Equal to PEFT's FourierFT (same seed -> the same entries).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, DeltaLayer, Method, MethodConfig, replace_module, resolve_targets


@dataclass
class FourierFTConfig(MethodConfig):
    n_frequency: int = option(1000, "number n of trained spectral coefficients per layer (FourierFT uses 1000 for "
                                    "RoBERTa-base); capped at d * k", low=1)
    scaling: float = option(150.0, "alpha of eq. (3) (FourierFT: 150 on GLUE with RoBERTa-base)", low=0.0)
    entry_seed: int = option(777, "seed of the random spectral entries E (PEFT's random_loc_seed)", low=0)
    init_zero: bool = option(False, "start the coefficients at zero (ΔW = 0) instead of N(0, 1) as in the paper")


class FourierLinear(DeltaLayer):
    def __init__(self, base: nn.Linear, n_frequency: int, scaling: float, entry_seed: int, init_zero: bool):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        n = min(n_frequency, self.in_features * self.out_features)
        flat = torch.randperm(self.out_features * self.in_features,
                              generator=torch.Generator().manual_seed(entry_seed))[:n]  # E, sec. 3.1
        self.register_buffer("indices", torch.stack([flat // self.in_features, flat % self.in_features]),
                             persistent=False)  # (2, n)
        self.fourierft_spectrum = nn.Parameter(torch.zeros(n) if init_zero else torch.randn(n))  # c
        self.scaling, self.merged = scaling, False

    def delta_weight(self) -> torch.Tensor:
        dense = torch.zeros(self.out_features, self.in_features, device=self.fourierft_spectrum.device)
        dense[self.indices[0], self.indices[1]] = self.fourierft_spectrum.float()  # eq. (2): F = TOSPARSE(c, E)
        return torch.fft.ifft2(dense).real * self.scaling  # eq. (3): ΔW = alpha Re(IDFT2(F))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return self.base(x) + F.linear(x, self.delta_weight().to(x.dtype))  # eq. (4)


class FourierFT(Method):
    name = "fourierft"
    title = "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform"
    paper = "2405.03003"
    family = "efficiency-freezing-sharing"
    config_cls = FourierFTConfig
    default_lr = 5e-2  # few coefficients: FourierFT's GLUE table uses 5e-2..1e-1
    mergeable = True
    layer_type = FourierLinear

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        self.freeze_all_but_head(model, ctx)
        c = self.config
        for name in resolve_targets(model, c.target_modules, ctx):
            replace_module(model, name, FourierLinear(model.get_submodule(name), c.n_frequency, c.scaling,
                                                      c.entry_seed, c.init_zero))
        return model

