"""HetLoRA: "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models" (Cho et al.,
arXiv 2401.06432).

Clients hold different ranks r_i <= r (`client_ranks`). Each round the server sends client i the
leading rank-r_i part of the global factors (B[:, :r_i], A[:r_i]); after its local steps the client
may prune its own rank (*rank self-pruning*): when the last `prune_step` rank components carry less
than `prune_threshold` of the update's norm, ||s B_tail A_tail||_F / ||s B A||_F < threshold, they
are dropped and the client keeps the smaller rank from then on. The server zero-pads every upload
to rank r and averages the factors with *sparsity-weighted aggregation*: client i's weight is
||s B_i A_i||_F / Σ_j ||s B_j A_j||_F instead of its data size (sec. 3 of HetLoRA), so clients
whose update is small (low rank, pruned) count less. Factor averaging stays inexact, as FedIT's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.federated.base import State, layer_prefixes, normalised, weighted_mean
from lorabench.methods.federated.hetero import HeteroRankConfig, HeteroRankLoRA, pad, truncate
from lorabench.methods.lora import LoraLinear


@dataclass
class HetLoraConfig(HeteroRankConfig):
    prune_threshold: float = option(0.1, "rank self-pruning: drop the last prune_step rank components when their "
                                         "share of the update's Frobenius norm is below this (0 = never prune)",
                                    low=0.0, high=1.0)
    prune_step: int = option(1, "rank components dropped at once by self-pruning", low=1)
    min_rank: int = option(1, "self-pruning never goes below this rank", low=1)


class HetLoRA(HeteroRankLoRA):
    name = "hetlora"
    title = "Heterogeneous LoRA for federated fine-tuning of on-device foundation models"
    paper = "2401.06432"
    config_cls = HetLoraConfig
    mechanism_metrics = {"tail_norm_ratio": "share of the update's norm in the last prune_step rank components "
                                            "(mean over layers), the self-pruning criterion",
                         "rank_after_pruning": "the client's rank after self-pruning"}
    round_metrics = {"client_ranks": "rank of each client sampled this round, after self-pruning",
                     "aggregation_weights": "sparsity-weighted aggregation weights ||s B_i A_i|| / Σ_j ||s B_j A_j||"}

    def __init__(self, config=None):
        super().__init__(config)
        self.ranks: dict[int, int] = {}  # server: each client's current rank (self-pruned ranks persist)
        self.last_weights: list[float] = []

    def rank_of(self, slot: int) -> int:
        return self.ranks.get(slot, super().rank_of(slot))

    def download(self, global_state: State, slot: int, n_clients: int) -> State:
        return truncate(global_state, self.rank_of(slot))

    @torch.no_grad()
    def load_state(self, model, state: State) -> None:
        """A client whose rank was self-pruned in an earlier round keeps the smaller rank (sec. 3 of HetLoRA): the
        server remembers it and sends the rank-r'_i part, while the client, rebuilt each round from its slot, holds
        its starting rank r_i >= r'_i. Its layers take the rank the server sent before the tensors are copied."""
        layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
        for p in layer_prefixes(state):
            layer = layers.get(p)
            sent = state[f"{p}.lora_A"].shape[0]
            if layer is not None and self.config.min_rank <= sent < layer.rank:
                layer.lora_A = torch.nn.Parameter(layer.lora_A[:sent].clone())
                layer.lora_B = torch.nn.Parameter(layer.lora_B[:, :sent].clone())
                layer.rank = sent
        super().load_state(model, state)

    @torch.no_grad()
    def on_train_end(self, state: TrainState) -> None:
        """Rank self-pruning (sec. 3 of HetLoRA): measure the tail's share of the update, prune it if small."""
        c = self.config
        layers = self.lora_layers(state.model)
        r = layers[0].rank
        ratios = []
        for layer in layers:
            full = torch.linalg.matrix_norm(layer.lora_B @ layer.lora_A)
            k = max(r - c.prune_step, 0)
            tail = torch.linalg.matrix_norm(layer.lora_B[:, k:] @ layer.lora_A[k:])
            ratios.append(float(tail / full) if full > 0 else 0.0)
        ratio = sum(ratios) / len(ratios)
        new_r = r
        if ratio < c.prune_threshold and r - c.prune_step >= c.min_rank:
            new_r = r - c.prune_step
            for layer in layers:  # the pruned components stop contributing: zero them, upload() slices them off
                layer.lora_A[new_r:].zero_()
                layer.lora_B[:, new_r:].zero_()
        self.pruned_rank = new_r
        state.metrics.update({"tail_norm_ratio": round(ratio, 6), "rank_after_pruning": new_r})

    def upload(self, model) -> State:
        out = super().upload(model)
        return truncate(out, getattr(self, "pruned_rank", None) or self.client_rank or self.config.rank)

    def aggregate(self, global_state, uploads, weights, slots, n_clients):
        s = self.delta_scale()
        for u, slot in zip(uploads, slots):
            self.ranks[slot] = u[f"{layer_prefixes(u)[0]}.lora_A"].shape[0]  # a pruned rank persists
        norms = [sum(float(torch.linalg.matrix_norm(s * (u[f"{p}.lora_B"].float() @ u[f"{p}.lora_A"].float())) ** 2)
                     for p in layer_prefixes(u)) ** 0.5 for u in uploads]
        w = normalised(norms)  # sparsity-weighted aggregation (sec. 3 of HetLoRA)
        padded = [pad(u, self.config.rank) for u in uploads]
        new = dict(global_state)
        for k in padded[0]:
            new[k] = weighted_mean([u[k] for u in padded], w)
        self.last_weights = w
        return new, w

    def round_summary(self, slots: list[int]) -> dict:
        return {"client_ranks": [self.rank_of(s) for s in slots],
                "aggregation_weights": [round(x, 4) for x in self.last_weights]}
