"""Fast LoRA (fLoRA): Batched Low-Rank Adaptation of Foundation Models (arXiv 2312.05677).

Every example of a batch may carry its own adapter (Wen & Chaudhuri, arXiv 2312.05677, sec. 3): fLoRA makes the
adapter element-wise, so that a batch of examples with different adapters is still one pass through the shared
weight W0. Adapter i is W_i = W0 ∘ (Σ_j a_ij b_ij^T) (out x in; a_ij ∈ R^out, b_ij ∈ R^in, j = 1..r), so

    y_i = W_i x_i = Σ_j a_ij ∘ (W0 (b_ij ∘ x_i))                 (fLoRA; rank 1: Y = A ∘ ((B ∘ X) W0))

for the whole batch at once: each example's input scaled element-wise by its b_ij, one GEMM with W0 for all of
them (r times the rows), each output scaled by its a_ij, summed over j. Nothing is gathered per adapter, which is
what makes it fast at low rank; the cost grows with r (r GEMMs of W0's size, against LoRA's two thin ones).

Here an example's adapter is its task id (protocol (b) passes `task_ids`; a single-task trial is adapter 0), one
adapter per training task; an example whose task has no adapter (-1: a held-out task) gets W0 alone. At init
a_i1 = b_i1 = 1 and a_ij = 0 for j > 1 (b_ij random), so every W_i = W0: the base model, as LoRA's B = 0.
`lorabench/bench/fast_lora.py` measures its throughput against the BGMV op (lorabench/ops, additive LoRA per row)
and against a loop over the batch's adapters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, MethodConfig, TrainState, replace_module, resolve_targets
from lorabench.methods.cross_task.mixture import MixtureMethod, Routing


@dataclass
class FastLoraConfig(MethodConfig):
    adapters: int = option(1, "adapters per layer: adapter t serves the examples of task t (set it to the number of "
                              "training tasks)", low=1, high=4096)
    rank: int = option(2, "r: rank-1 element-wise terms per adapter (each costs one more pass through W0)", low=1,
                       high=64)
    init_std: float = option(0.02, "std of the b_ij of the terms j > 1 at init (their a_ij start at 0)", low=0.0)


def flora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                  B: torch.Tensor) -> torch.Tensor:
    """y[i] = Σ_j A[i, j] ∘ (W0 (B[i, j] ∘ x[i])) + bias for a batch x (N, T, in), A (N, r, out), B (N, r, in)."""
    z = x[:, None, :, :] * B[:, :, None, :]                    # (N, r, T, in): b_ij ∘ x_i
    y = F.linear(z, weight)                                     # (N, r, T, out): W0 (b_ij ∘ x_i), one GEMM
    y = (y * A[:, :, None, :]).sum(1)                           # (N, T, out): Σ_j a_ij ∘ ...
    return y if bias is None else y + bias


class FastLoraLinear(nn.Module):
    """A frozen linear with `adapters` element-wise adapters, one chosen per example (module docstring)."""

    def __init__(self, base: nn.Linear, c: FastLoraConfig, routing: Routing):
        super().__init__()
        self.base, self.c, self.routing = base, c, routing
        self.in_features, self.out_features = base.in_features, base.out_features
        dt, dev = base.weight.dtype, base.weight.device
        n, r = c.adapters, c.rank
        self.lora_A = nn.Parameter(torch.zeros(n, r, base.out_features, dtype=dt, device=dev))   # a_ij (out side)
        self.lora_B = nn.Parameter(torch.zeros(n, r, base.in_features, dtype=dt, device=dev))    # b_ij (in side)
        with torch.no_grad():
            self.lora_A[:, 0] = 1.0                     # a_i1 b_i1^T = 1: W_i = W0 at init
            self.lora_B[:, 0] = 1.0
            self.lora_B[:, 1:].normal_(0.0, c.init_std)
        self.rows = torch.zeros(n + 1)                  # examples per adapter since the last reading (last: none)

    def adapter_ids(self, n: int) -> torch.Tensor:
        ids = self.routing.task_ids
        ids = torch.full((n,), self.routing.default_task, dtype=torch.long) if ids is None or ids.shape[0] != n else ids
        if bool((ids >= self.c.adapters).any()):
            raise ValueError(f"task id {int(ids.max())} has no fast-lora adapter: this layer has {self.c.adapters} "
                             f"(adapters=); set adapters to the number of training tasks")
        return ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 2
        x3 = x[:, None, :] if squeeze else x                                    # (N, T, in)
        ids = self.adapter_ids(x3.shape[0]).to(x3.device)
        known = ids >= 0
        A, B = self.lora_A[ids.clamp(min=0)], self.lora_B[ids.clamp(min=0)]    # (N, r, out), (N, r, in)
        out = flora_forward(x3, self.base.weight, self.base.bias, A, B)
        if not bool(known.all()):                                               # no adapter: W0 alone
            out = torch.where(known[:, None, None], out, self.base(x3))
        with torch.no_grad():
            self.rows += torch.bincount(torch.where(known, ids, self.c.adapters).cpu(), minlength=self.c.adapters + 1)
        return out[:, 0] if squeeze else out

    def reset_stats(self) -> None:
        self.rows.zero_()

    def delta(self, adapter: int) -> torch.Tensor:
        """Σ_j a_ij b_ij^T (out, in): adapter i's element-wise multiplier of W0 (1 everywhere at init)."""
        return torch.einsum("jo,jk->ok", self.lora_A[adapter], self.lora_B[adapter])

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={self.c.adapters}, rank={self.c.rank}"


class FastLoRA(MixtureMethod):
    __doc__ = __doc__
    name = "fast-lora"
    title = "Fast LoRA: Batched low-rank adaptation of foundation models"
    paper = "2312.05677"
    config_cls = FastLoraConfig
    default_lr = 1e-3
    mechanism_metrics = {
        "adapter_use": "per adapter (and, last, no adapter), the share of the examples that used it, averaged over "
                       "layers (training)",
        "multiplier_deviation": "mean |Σ_j a_ij b_ij^T - 1| over the entries of each adapter's multiplier of W0, "
                                "averaged over layers and adapters (0 = the base model)",
    }

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        self.freeze_all_but_head(model, ctx)
        for name in resolve_targets(model, self.config.target_modules, ctx):
            replace_module(model, name, FastLoraLinear(model.get_submodule(name), self.config, self.routing))
        model.register_forward_pre_hook(self.routing.hook, with_kwargs=True)
        return model

    def mixture_layers(self, model: nn.Module) -> list[FastLoraLinear]:
        return [m for m in model.modules() if isinstance(m, FastLoraLinear)]

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        return None

    def on_step_begin(self, state: TrainState) -> None:
        pass

    def on_train_begin(self, state: TrainState) -> None:
        for m in self.mixture_layers(state.model):
            m.reset_stats()

    def on_train_end(self, state: TrainState) -> None:
        state.metrics.update(self.router_metrics(state.model))

    @torch.no_grad()
    def router_metrics(self, model: nn.Module, reset: bool = True) -> dict:
        layers = self.mixture_layers(model)
        if not layers or not float(layers[0].rows.sum()):
            return {}
        use = sum(m.rows / m.rows.sum() for m in layers) / len(layers)
        dev = sum(float((m.delta(i) - 1).abs().mean()) for m in layers for i in range(self.config.adapters))
        if reset:
            for m in layers:
                m.reset_stats()
        return {"adapter_use": [round(float(u), 4) for u in use],
                "multiplier_deviation": round(dev / (len(layers) * self.config.adapters), 6)}
