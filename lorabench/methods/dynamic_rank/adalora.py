"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., arXiv 2303.10512).

Each adapted layer is an SVD-shaped update ΔW = P Λ Q (eq. (3) of AdaLoRA; here B diag(E) A with
B = P (d, r), E = the diagonal Λ (r,), A = Q (r, k)), scaled by alpha / r as PEFT does. Training
adds the orthogonality regulariser R(P, Q) = ||P^T P - I||_F + ||Q Q^T - I||_F (eq. (4); PEFT's
unsquared norm, averaged over the matrices) and, through the hooks, prunes the singular values:

- importance of every entry (eqs. (8)-(10)): smoothed sensitivity I = β1 I + (1-β1) |w ∇w| and
  uncertainty U = β2 U + (1-β2) |I_t - I|, score s = I U;
- triplet score S_i = s(λ_i) + mean_j s(Q_ij) + mean_k s(P_ki) (eq. (11));
- a global budget b(t) decreasing cubically from the initial to the target total rank between
  t_i and T - t_f (eq. (12)), every ΔT steps keeping the b(t) triplets of highest score and
  zeroing the other λ (eq. (7)); after T - t_f the allocation is frozen.

The schedule and the allocator follow PEFT's RankAllocator, so the two agree step by step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import (ApplyContext, DeltaLayer, Method, MethodConfig, TrainState, interval_in_budget,
                                   replace_module, resolve_targets)


@dataclass
class AdaLoraConfig(MethodConfig):
    init_rank: int = option(12, "initial rank of every layer (AdaLoRA's b(0) / number of layers)", low=1, high=4096)
    target_rank: int = option(8, "average final rank per layer (the target budget b(T) / number of layers)",
                              low=1, high=4096)
    alpha: float = option(8.0, "scale numerator: ΔW is scaled by alpha / r (PEFT's lora_alpha / ranknum)", low=0.0)
    dropout: float = option(0.0, "dropout on the input of the adapter path", low=0.0, high=0.99)
    tinit: float = option(0.1, "fraction of the steps before pruning starts (t_i of eq. (12))", low=0.0, high=1.0)
    tfinal: float = option(0.2, "fraction of the steps at the end with the allocation frozen (t_f of eq. (12))",
                           low=0.0, high=1.0)
    delta_t: int | None = option(
        None, "steps between two budget allocations (ΔT); None = a tenth of the pruning window (the paper: "
              "ΔT = 100 over windows of a few thousand steps), so the cubic schedule is followed at any budget; "
              "must fit in the window", low=1)
    beta1: float = option(0.85, "EMA coefficient of the sensitivity (eq. (9))", low=0.0, high=1.0)
    beta2: float = option(0.85, "EMA coefficient of the uncertainty (eq. (10))", low=0.0, high=1.0)
    orth_reg_weight: float = option(0.1, "weight gamma of the orthogonality regulariser R(P, Q) (eq. (4))", low=0.0)

    def __post_init__(self):
        if self.target_rank > self.init_rank:
            raise ValueError(f"target_rank {self.target_rank} exceeds init_rank {self.init_rank}; AdaLoRA only prunes")
        if self.tinit + self.tfinal >= 1.0:
            raise ValueError(f"tinit + tfinal = {self.tinit + self.tfinal} leaves no steps for pruning; keep it below 1")


class SVDLinear(DeltaLayer):
    """h = W0 x + (alpha / r) B diag(E) A x (eq. (3) of AdaLoRA, PEFT's SVDLinear)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        kw = dict(dtype=w.dtype, device=w.device)
        self.lora_A = nn.Parameter(torch.randn(rank, self.in_features, **kw) * 0.02)  # Q, (r, k)
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, **kw))  # Λ, zero so that ΔW = 0 at init
        self.lora_B = nn.Parameter(torch.randn(self.out_features, rank, **kw) * 0.02)  # P, (d, r)
        self.register_buffer("ranknum", torch.tensor(float(rank)), persistent=False)
        self.alpha, self.dropout_p, self.merged = alpha, dropout, False

    @property
    def scale(self) -> float:
        return self.alpha / (float(self.ranknum) + 1e-5)  # PEFT: scaling / (ranknum + 1e-5)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scale  # P Λ Q, (d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        h = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        return self.base(x) + (h @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scale


def budget_schedule(step: int, total: int, tinit: int, tfinal: int, init_bgt: int, target_bgt: int,
                    delta_t: int) -> tuple[int, bool]:
    """eq. (12) of AdaLoRA: (budget b(t), whether to re-allocate at this step), as PEFT's RankAllocator."""
    if step <= tinit:
        return init_bgt, False  # warm-up: full rank
    if step > total - tfinal:
        return target_bgt, True  # final phase: target budget, allocation fixed
    mul = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * mul ** 3 + target_bgt), step % delta_t == 0  # cubic decrease


class AdaLoRA(Method):
    name = "adalora"
    title = "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
    paper = "2303.10512"
    family = "dynamic-rank"
    config_cls = AdaLoraConfig
    default_lr = 1e-3  # AdaLoRA's GLUE runs use 5e-4..1.2e-3
    mergeable = True
    layer_type = SVDLinear
    mechanism_metrics = {
        "adalora_ranks": "final rank of every layer (non-zero λ), in module order; they differ when budget moved",
        "adalora_budget": "total rank b(T) at the end (init_rank x layers at the start, eq. (12))",
        "allocations": "budget allocations done (top-b(t) triplets kept by importance, eq. (7)-(11))",
        "orthogonality_reg": "the weighted orthogonality regulariser gamma R(P, Q) at the last step (eq. (4))",
    }

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        self.freeze_all_but_head(model, ctx)
        c = self.config
        for name in resolve_targets(model, c.target_modules, ctx):
            replace_module(model, name, SVDLinear(model.get_submodule(name), c.init_rank, c.alpha, c.dropout))
        return model

    # -- training: orthogonality regulariser and budget allocation through the hooks ---------
    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        if self.config.orth_reg_weight == 0:
            return None
        terms = []
        for m in self.layers(state.model):
            for para, cov in ((m.lora_A, m.lora_A @ m.lora_A.T), (m.lora_B, m.lora_B.T @ m.lora_B)):  # Q Q^T, P^T P
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                terms.append(torch.linalg.norm(cov - eye, "fro"))  # eq. (4), PEFT's unsquared norm
        reg = self.config.orth_reg_weight * torch.stack(terms).mean()
        state.metrics["orthogonality_reg"] = round(float(reg.detach()), 6)
        return reg

    def on_train_begin(self, state: TrainState) -> None:
        c = self.config
        self.total = state.total_steps
        self.tinit, self.tfinal = int(c.tinit * self.total), int(c.tfinal * self.total)
        self.delta_t = interval_in_budget(c.delta_t, 0.1, self.total - self.tfinal - self.tinit, "delta_t")
        self.allocations = 0
        layers = self.layers(state.model)
        self.init_bgt, self.target_bgt = c.init_rank * len(layers), c.target_rank * len(layers)
        self.ipt, self.exp_ipt, self.exp_unc = {}, {}, {}
        self.rank_mask: dict[int, torch.Tensor] | None = None
        state.metrics["adalora_budget"] = self.init_bgt

    @torch.no_grad()
    def update_importance(self, layers: list[SVDLinear]) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for i, m in enumerate(layers):
            for key, p in (("A", m.lora_A), ("E", m.lora_E), ("B", m.lora_B)):
                if p.grad is None:
                    continue
                k = (i, key)
                ipt = (p * p.grad).abs()  # sensitivity |w ∇w|, eq. (8)
                if k not in self.exp_ipt:
                    self.exp_ipt[k], self.exp_unc[k] = torch.zeros_like(p), torch.zeros_like(p)
                self.exp_ipt[k] = b1 * self.exp_ipt[k] + (1 - b1) * ipt  # eq. (9)
                self.exp_unc[k] = b2 * self.exp_unc[k] + (1 - b2) * (ipt - self.exp_ipt[k]).abs()  # eq. (10)

    def triplet_scores(self, layers: list[SVDLinear]) -> list[torch.Tensor]:
        out = []
        for i, m in enumerate(layers):
            s = {key: self.exp_ipt[(i, key)] * self.exp_unc[(i, key)] for key in "AEB"}
            out.append(s["E"].view(-1) + s["A"].mean(1) + s["B"].mean(0))  # eq. (11), (r,)
        return out

    @torch.no_grad()
    def mask_to_budget(self, layers: list[SVDLinear], budget: int) -> None:
        scores = self.triplet_scores(layers)
        threshold = torch.kthvalue(torch.cat(scores), k=self.init_bgt - budget)[0].item()
        self.allocations += 1
        self.rank_mask = {}
        for i, (m, s) in enumerate(zip(layers, scores)):
            keep = s > threshold  # eq. (7): λ_i = 0 unless among the top b(t)
            m.lora_E.masked_fill_(~keep[:, None], 0.0)
            self.rank_mask[i] = keep

    def on_step_end(self, state: TrainState) -> None:
        layers = self.layers(state.model)
        step = state.step
        if step < self.total - self.tfinal:
            self.update_importance(layers)
            budget, do_mask = budget_schedule(step, self.total, self.tinit, self.tfinal, self.init_bgt,
                                              self.target_bgt, self.delta_t)
            if do_mask:
                self.mask_to_budget(layers, budget)
        elif step == self.total - self.tfinal:
            self.update_importance(layers)
            budget = self.target_bgt
            self.mask_to_budget(layers, budget)  # final allocation
        else:
            budget = self.target_bgt
            with torch.no_grad():
                for i, m in enumerate(layers):  # keep the frozen allocation
                    m.lora_E.masked_fill_(~self.rank_mask[i][:, None], 0.0)
        state.metrics["adalora_budget"] = budget
        state.metrics["allocations"] = self.allocations
        if self.rank_mask is not None:
            state.metrics["adalora_ranks"] = [int(k.sum()) for k in self.rank_mask.values()]

    # -- merge ------------------------------------------------------------------------------