"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., arXiv 2310.11454).

h = W0 x + Λ_b B Λ_d A x   (eq. (1) of VeRA)

A (r, k) and B (d, r) are frozen random matrices shared by every adapted layer (drawn once from a
seeded generator, kaiming-uniform, sec. 3.1), sliced to each layer's shape; only the scaling
vectors d (r,) and b (d,) are trained: Λ_d = diag(d) initialised to a constant d_initial, Λ_b =
diag(b) to zero so that the update is zero at step 0 (sec. 3.2). A and B are re-drawn from the key
when an adapter is loaded, so the adapter stores only the vectors. Equal to PEFT's VeRA (same
key -> bit-identical A, B).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, DeltaLayer, Method, MethodConfig, replace_module, resolve_targets


@dataclass
class VeraConfig(MethodConfig):
    rank: int = option(256, "rank r of the shared random matrices (VeRA uses large r: 256..1024; "
                            "the trained parameters are only r + d per layer)", low=1, high=16384)
    d_initial: float = option(0.1, "initial value of every entry of the vector d (sec. 3.2 / table 7 of VeRA)")
    projection_seed: int = option(0, "seed of the generator that draws the shared A and B (PEFT's projection_prng_key)",
                                  low=0)
    dropout: float = option(0.0, "dropout probability on the input of the adapter path", low=0.0, high=0.99)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with gain sqrt(2) over fan_in = shape[1], drawn from `generator` (as PEFT's VeRA)."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraLinear(DeltaLayer):
    def __init__(self, base: nn.Linear, shared_A: torch.Tensor, shared_B: torch.Tensor, d_initial: float,
                 dropout: float):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        # slices of the shared frozen matrices (views: one copy in memory), not saved with the adapter
        self.register_buffer("vera_A", shared_A[:, : self.in_features].to(w.dtype), persistent=False)  # (r, k)
        self.register_buffer("vera_B", shared_B[: self.out_features, :].to(w.dtype), persistent=False)  # (d, r)
        r = shared_A.shape[0]
        self.vera_lambda_d = nn.Parameter(torch.full((r,), d_initial, dtype=w.dtype, device=w.device))  # Λ_d
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, dtype=w.dtype, device=w.device))  # Λ_b = 0
        self.dropout_p = dropout
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        # ΔW = Λ_b B Λ_d A, (d, k)
        return self.vera_lambda_b[:, None] * (self.vera_B @ (self.vera_lambda_d[:, None] * self.vera_A))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        h = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        # eq. (1): W0 x + Λ_b B Λ_d A x
        return self.base(x) + self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(h, self.vera_A), self.vera_B)


class VeRA(Method):
    name = "vera"
    title = "VeRA: Vector-based Random Matrix Adaptation"
    paper = "2310.11454"
    family = "efficiency-freezing-sharing"
    config_cls = VeraConfig
    default_lr = 1e-2  # only scaling vectors are trained: VeRA's table 8 uses 1e-2..4e-2 on GLUE
    mergeable = True
    layer_type = VeraLinear

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        self.freeze_all_but_head(model, ctx)
        names = resolve_targets(model, self.config.target_modules, ctx)
        layers = [model.get_submodule(n) for n in names]
        max_out = max(m.out_features for m in layers)
        max_in = max(m.in_features for m in layers)
        g = torch.Generator(device="cpu").manual_seed(self.config.projection_seed)
        shared_A = kaiming_uniform((self.config.rank, max_in), g)  # drawn first, as PEFT
        shared_B = kaiming_uniform((max_out, self.config.rank), g)
        dev = layers[0].weight.device
        shared_A, shared_B = shared_A.to(dev), shared_B.to(dev)
        for n, m in zip(names, layers):
            replace_module(model, n, VeraLinear(m, shared_A, shared_B, self.config.d_initial, self.config.dropout))
        return model

