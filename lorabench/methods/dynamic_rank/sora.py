"""SoRA: Sparse Low-Rank Adaptation of Pre-trained Language Models (Ding et al., arXiv 2311.11696).

LoRA with a gate vector g (r,) between the factors, h = W0 x + s B diag(g) A x (eq. (4) of SoRA),
and a proximal gradient step on g after every optimizer step that sparsifies it (eq. (6)):

  g <- sign(g) ⊙ max(|g| - η λ, 0)

where η is the current learning rate of the gate. Ranks whose gate reaches zero are pruned: the
effective rank of each layer is the number of non-zero gates (recorded as `sora_ranks`). Done in
the `on_step_end` hook.

The gate starts as g ~ N(0, I) (the official code, TsinghuaC3I/SoRA src/lora.py: `torch.randn(1, r)`),
not at 1: with Adam a gate moves by at most η per step, so gates started at 1 can never reach zero
in a short run (the published rows kept every rank: they were LoRA). The proximal pull per step
is η_t λ; with `sparse_lambda` None, λ = max(0.375, gate_shrink / Σ_t η_t): 0.375 is the official
scripts' ratio of threshold to learning rate (lambda2 = 3e-4 against lr 8e-4), under which a gate
the gradient keeps pushing survives; the budget term makes the total pull Σ_t η_t λ at least
`gate_shrink` at any trial length, so the gates the task does not hold up near zero are pruned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.lora import LoRA, LoraConfig, LoraLinear, LoraVariant


@dataclass
class SoraConfig(LoraConfig):
    sparse_lambda: float | None = option(
        None, "λ of the L1 proximal step on the gate (eq. (6)); larger prunes more ranks; None = "
              "max(0.375, gate_shrink / (sum of the learning rates over the trial's steps))", low=0.0)
    gate_shrink: float = option(
        0.1, "with sparse_lambda None: the least total proximal pull Σ_t η_t λ on each gate over the run "
             "(gates start N(0, 1): ~8% of them lie within 0.1 of zero)", low=0.0)


class GateVariant(LoraVariant):
    def init(self, layer: LoraLinear) -> None:
        # g ~ N(0, I) as in the official code; B = 0 keeps ΔW = 0 at init
        layer.lora_gate = nn.Parameter(torch.randn(layer.rank, dtype=layer.lora_A.dtype, device=layer.lora_A.device))

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
        # eq. (4): W0 x + s B (g ⊙ A x)
        return layer.base(x) + F.linear(layer.lora_gate * F.linear(h, layer.lora_A), layer.lora_B) * layer.scale

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return layer.scale * (layer.lora_B @ (layer.lora_gate[:, None] * layer.lora_A))


def soft_threshold_(g: torch.Tensor, threshold: float) -> None:
    """eq. (6): the proximal operator of threshold * ||g||_1."""
    with torch.no_grad():
        g.copy_(torch.sign(g) * torch.clamp(g.abs() - threshold, min=0.0))


class SoRA(LoRA):
    name = "sora"
    title = "Sparse Low-rank Adaptation of Pre-trained Language Models"
    paper = "2311.11696"
    family = "dynamic-rank"
    config_cls = SoraConfig
    default_lr = 5e-4
    mechanism_metrics = {
        "sora_ranks": "non-zero gates of every layer at the end (its effective rank), in module order",
        "sora_initial_rank": "the rank r every layer starts with (all gates 1)",
        "sora_lambda": "the λ of the proximal step this trial used",
        "gate_l1_mean": "mean |g| over all gates at the end (about 0.8 at the start: g ~ N(0, 1))",
    }

    def on_train_begin(self, state: TrainState) -> None:
        layers = self.lora_layers(state.model)
        lam = self.config.sparse_lambda
        if lam is None:
            gates = {id(m.lora_gate) for m in layers}
            base = next(g.get("initial_lr", g["lr"]) for g in state.optimizer.param_groups
                        if any(id(p) in gates for p in g["params"]))
            lambdas = getattr(state.scheduler, "lr_lambdas", None)
            factor = sum(lambdas[0](t) for t in range(state.total_steps)) if lambdas else state.total_steps
            lam = max(0.375, self.config.gate_shrink / max(base * factor, 1e-12))
        self.lam = lam
        state.metrics["sora_lambda"] = round(lam, 6)
        state.metrics["sora_initial_rank"] = self.config.rank

    def variant(self) -> LoraVariant:
        return GateVariant()

    def on_step_begin(self, state: TrainState) -> None:
        # η_t of eq. (6) is the rate this step's optimizer update uses; by on_step_end the scheduler has moved on
        self.lr_of = {id(p): g["lr"] for g in state.optimizer.param_groups for p in g["params"]}

    def on_step_end(self, state: TrainState) -> None:
        lr_of = self.lr_of
        ranks = []
        for layer in self.lora_layers(state.model):
            soft_threshold_(layer.lora_gate, lr_of[id(layer.lora_gate)] * self.lam)   # eq. (6)
            ranks.append(int(torch.count_nonzero(layer.lora_gate)))
        state.metrics["sora_ranks"] = ranks

    def on_train_end(self, state: TrainState) -> None:
        gates = torch.cat([m.lora_gate.detach().abs() for m in self.lora_layers(state.model)])
        state.metrics["gate_l1_mean"] = round(float(gates.mean()), 5)
        state.metrics["sora_ranks"] = [int(torch.count_nonzero(m.lora_gate)) for m in self.lora_layers(state.model)]
