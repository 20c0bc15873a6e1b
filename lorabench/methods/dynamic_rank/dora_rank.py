"""DoRA with dynamic rank distribution (Mao et al., ACL 2024, arXiv 2405.17357), registered as `dora-rank`.

Not the weight-decomposed DoRA (`dora`, arXiv 2402.09353): this DoRA splits a high-rank LoRA into
r single-rank components with one scalar each, ΔW = s Σ_i c_i b_i a_i = s B diag(c) A (sec. 3.1),
and prunes the components that matter least while training so that the parameter budget flows to
the layers that need it (sec. 3.2):

- importance of component i: its share of the update, s_i = ||c_i b_i a_i||_F / ||ΔW||_F,
  smoothed by an EMA (beta);
- a cubic schedule (as AdaLoRA's) of the fraction of components pruned,
  (r - r_target) / r * (t / T_prune)^3, applied every `delta_t` steps between tinit and 1 - tfinal by
  zeroing c_i of the lowest-scoring components over the whole model; afterwards the mask is fixed;
- the dimensional equilibrium modulator (sec. 3.3): a regulariser, the mean variance of the rows of
  A and columns of B, that keeps the components' scales comparable so their scores are; it is
  switched off when pruning ends.

c starts at zero (ΔW = 0 at step 0), A and B both random. The importance, schedule and
regulariser follow the authors' code (github.com/MIkumikumi0116/DoRA); the regulariser weight is
lorabench's default, exposed as `dem_weight`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.lora import LoRA, LoraConfig, LoraLinear, LoraVariant
from lorabench.methods.dynamic_rank.sora import GateVariant


@dataclass
class DoraRankConfig(LoraConfig):
    rank: int = option(12, "initial rank r: the number of single-rank components per layer", low=1, high=4096)
    target_rank: int = option(8, "average rank per layer after pruning", low=1, high=4096)
    tinit: float = option(0.1, "fraction of the steps before pruning starts", low=0.0, high=1.0)
    tfinal: float = option(0.2, "fraction of the steps at the end with the mask fixed", low=0.0, high=1.0)
    delta_t: int = option(10, "steps between two pruning rounds", low=1)
    beta: float = option(0.85, "EMA coefficient of the component importance", low=0.0, high=1.0)
    dem_weight: float = option(0.1, "weight of the dimensional equilibrium modulator (variance regulariser)", low=0.0)
    eps: float = option(1e-6, "added to ||ΔW||_F in the importance ratio", low=0.0)

    def __post_init__(self):
        super().__post_init__()
        if self.target_rank > self.rank:
            raise ValueError(f"target_rank {self.target_rank} exceeds rank {self.rank}; dora-rank only prunes")
        if self.tinit + self.tfinal >= 1.0:
            raise ValueError(f"tinit + tfinal = {self.tinit + self.tfinal} leaves no steps for pruning; keep it below 1")


class ComponentVariant(GateVariant):
    """ΔW = s B diag(c) A with c = 0 and both factors random at init (sec. 3.1)."""

    def init(self, layer: LoraLinear) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))  # A is random already
        layer.lora_gate = nn.Parameter(torch.zeros(layer.rank, dtype=layer.lora_A.dtype, device=layer.lora_A.device))


def component_scores(layer: LoraLinear, eps: float) -> torch.Tensor:
    """s_i = ||c_i b_i a_i||_F / ||B diag(c) A||_F; ||b a^T||_F = ||b|| ||a|| for a rank-one term. (r,)"""
    with torch.no_grad():
        dW = layer.lora_B @ (layer.lora_gate[:, None] * layer.lora_A)
        norms = layer.lora_gate.abs() * layer.lora_B.norm(dim=0) * layer.lora_A.norm(dim=1)
        return norms / (dW.norm() + eps)


class DoraRank(LoRA):
    name = "dora-rank"
    title = "DoRA: Enhancing Parameter-Efficient Fine-Tuning with Dynamic Rank Distribution"
    paper = "2405.17357"
    family = "dynamic-rank"
    config_cls = DoraRankConfig
    mechanism_metrics = {
        "dora_rank_ranks": "components left in every layer after pruning, in module order",
    }
    default_lr = 5e-4

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.zero_init != "B":
            raise ValueError("dora-rank starts both factors random and the scalars at zero; leave zero_init at 'B'")

    def variant(self) -> LoraVariant:
        return ComponentVariant()

    def prune_window(self, step: int) -> tuple[int, int]:
        """(steps into the pruning window, index of its last step: the final pruning round)."""
        c = self.config
        return step - int(self.total * c.tinit), max(int(self.total * (1 - c.tinit - c.tfinal)) - 1, 0)

    def on_train_begin(self, state: TrainState) -> None:
        self.total = state.total_steps
        self.scores: dict[int, torch.Tensor] = {}
        self.final_mask: dict[int, torch.Tensor] | None = None

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        t, t_max = self.prune_window(state.step)
        if self.config.dem_weight == 0 or t > t_max:
            return None  # the modulator is switched off once pruning ends
        layers = self.lora_layers(state.model)
        var = sum(m.lora_A.var(dim=1).sum() + m.lora_B.var(dim=0).sum() for m in layers)
        return self.config.dem_weight * var / (2 * len(layers) * self.config.rank)  # mean component variance

    @torch.no_grad()
    def on_step_end(self, state: TrainState) -> None:
        c = self.config
        layers = self.lora_layers(state.model)
        t, t_max = self.prune_window(state.step)
        if t > t_max:  # after pruning: keep the final mask
            if self.final_mask is not None:
                for i, m in enumerate(layers):
                    m.lora_gate[self.final_mask[i]] = 0.0
            return
        for i, m in enumerate(layers):  # EMA of the importance
            s = component_scores(m, c.eps)
            self.scores[i] = c.beta * self.scores.get(i, torch.zeros_like(s)) + (1 - c.beta) * s
        if t < 0 or not (t % c.delta_t == 0 or t == t_max):
            return
        scores = torch.cat([self.scores[i] for i in range(len(layers))])
        rate = (c.rank - c.target_rank) / c.rank * (t / max(t_max, 1)) ** 3  # cubic schedule
        n_prune = int(scores.numel() * rate)
        threshold = torch.kthvalue(scores, max(n_prune, 1)).values
        for i, m in enumerate(layers):
            pruned = self.scores[i] <= threshold
            m.lora_gate[pruned] = 0.0
            if t == t_max:
                self.final_mask = self.final_mask or {}
                self.final_mask[i] = pruned
        state.metrics["dora_rank_ranks"] = [int(torch.count_nonzero(m.lora_gate)) for m in layers]
