"""LTE: LoRA-the-Explorer, parallel low-rank adapters (Huh et al., arXiv 2402.16828).

N LoRA heads {B_n, A_n} share the frozen weight; each trains on its own stream of data, and
every `merge_every` steps the heads' average update is merged into the weight (eq. (4)):
W <- W + (s / N) sum_n B_n A_n, after which the heads restart (B_n = 0, fresh A_n), so the sum of
merged updates is not confined to rank r. The paper runs the heads on N workers; here one process
simulates them: step t trains head t mod N on that step's batch (each head sees its own 1/N of
the batches, `merge_every / N` local steps between merges); a restarted head's optimizer state
starts from zero. Evaluation and merging use the
average of the heads, W + ΔW_acc + (s / N) sum_n B_n A_n, which equals the merged model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState, interval_in_budget
from lorabench.methods.low_rank_bottleneck.layer import (HighRankLoRA, HighRankVariant, high_rank_layers,
                                               reset_optimizer_state)
from lorabench.methods.lora import LoRA, LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant, init_matrix


class ActiveHead:
    """Which head the current training step trains (shared by all layers of one model)."""
    index: int = 0


class LteVariant(HighRankVariant):
    """A (N, r, k), B (N, d, r): N heads; training uses head `active.index`, evaluation their mean."""

    def __init__(self, heads: int, active: ActiveHead, init: str = "kaiming"):
        super().__init__(init, "B")
        self.heads, self.active = heads, active

    def init(self, layer: LoraLinear) -> None:
        super().init(layer)
        n, r, like = self.heads, layer.rank, layer.lora_A
        layer.lora_A = nn.Parameter(torch.empty(n, r, layer.in_features, dtype=like.dtype, device=like.device))
        layer.lora_B = nn.Parameter(torch.zeros(n, layer.out_features, r, dtype=like.dtype, device=like.device))
        for a in layer.lora_A:
            init_matrix(a, self.init_kind, r)

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        w = layer.base.weight + layer.weight_delta
        h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
        if layer.training:
            i = self.active.index
            lora = F.linear(F.linear(h, layer.lora_A[i]), layer.lora_B[i])
        else:
            lora = torch.einsum("...k,nrk,ndr->...d", h, layer.lora_A, layer.lora_B) / self.heads
        return F.linear(x, w, layer.base.bias) + lora * layer.scale

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return layer.weight_delta + layer.scale * (layer.lora_B @ layer.lora_A).mean(dim=0)  # eq. (4)

    @torch.no_grad()
    def merge_low_rank(self, layer: LoraLinear, factor: float = 1.0) -> None:
        layer.weight_delta += factor * layer.scale * (layer.lora_B @ layer.lora_A).mean(dim=0)

    @torch.no_grad()
    def reinit_low_rank(self, layer: LoraLinear) -> None:
        for a in layer.lora_A:
            init_matrix(a, self.init_kind, layer.rank)
        layer.lora_B.zero_()


@dataclass
class LteConfig(LoraConfig):
    heads: int = option(4, "number N of parallel LoRA heads (the paper uses 4-32 workers)", low=1, high=256)
    merge_every: int | None = option(
        None, "merge the heads' mean update into W every this many steps (the paper's T); None = a quarter of "
              "the trial's steps but at least `heads` (one local step per head); must be below the steps", low=1)

    def __post_init__(self):
        super().__post_init__()
        if self.kernel == "fused" or self.zero_init != "B":
            raise ValueError("lte has its own multi-head forward: use kernel='reference' and zero_init='B'")


class LTE(HighRankLoRA, LoRA):
    name = "lte"
    title = "Training Neural Networks from Scratch with Parallel Low-Rank Adapters (LoRA-the-Explorer)"
    paper = "2402.16828"
    family = "low-rank-bottleneck"
    config_cls = LteConfig
    mechanism_metrics = {
        "merges": "merges of the heads' mean update into W (eq. (4)), each restarting the heads",
        "merge_every": "the merge period T in steps this trial used",
        "update_rank_mean": "mean numerical rank of the whole update W - W0 over the layers",
    }

    def __init__(self, config=None):
        super().__init__(config)
        self.active = ActiveHead()

    def variant(self) -> LoraVariant:
        return LteVariant(self.config.heads, self.active, self.config.init)

    def on_train_begin(self, state: TrainState) -> None:
        self.merges = 0
        window = state.total_steps - 1  # a merge after the last step would change nothing
        every = self.config.merge_every
        if every is None and window >= 1:
            every = min(window, max(self.config.heads, round(0.25 * window)))
        self.every = interval_in_budget(every, 0.25, window, "merge_every")
        state.metrics["merge_every"] = self.every

    def on_step_begin(self, state: TrainState) -> None:
        self.active.index = state.step % self.config.heads  # head n trains on its own share of the batches

    def on_step_end(self, state: TrainState) -> None:
        done = state.step + 1
        if done % self.every == 0 and done < state.total_steps:
            layers = high_rank_layers(state.model)
            for m in layers:
                m.variant.merge_low_rank(m)
                m.variant.reinit_low_rank(m)
            # restarted heads start a fresh optimizer state, as a restarted LoRA does
            reset_optimizer_state(state.optimizer, [p for m in layers for p in (m.lora_A, m.lora_B)], 1.0)
            self.merges += 1

    def on_train_end(self, state: TrainState) -> None:
        state.metrics["merges"] = self.merges
        self.report_rank(state)
