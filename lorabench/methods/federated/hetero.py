"""Clients with different LoRA ranks (device heterogeneity): the config and layer shared by FlexLoRA and HetLoRA.

Client `slot` trains rank `client_ranks[slot % len(client_ranks)]`; the server's global adapter has
rank `rank` (the largest). Every client scales its update by alpha / rank, the global rank's
scale, so a client's rank-r_i factors zero-padded to rank r give the same product (HetLoRA's
padding is exact, and FlexLoRA's truncations compare across clients).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from lorabench.config import option
from lorabench.methods.federated.base import FederatedLoRA, State, layer_prefixes
from lorabench.methods.lora import LoraConfig, LoraLinear


@dataclass
class HeteroRankConfig(LoraConfig):
    client_ranks: list[int] = option(default_factory=lambda: [2, 4, 8], help=(
        "LoRA rank of each client, cycled over the clients (client i gets client_ranks[i % len]): the clients' "
        "resources; each at most `rank`, the global adapter's rank"))

    def __post_init__(self):
        super().__post_init__()
        if not self.client_ranks or any(r < 1 or r > self.rank for r in self.client_ranks):
            raise ValueError(f"client_ranks must be a non-empty list of ranks in 1..rank={self.rank}, "
                             f"got {self.client_ranks}")


class HeteroRankLoRA(FederatedLoRA):
    config_cls = HeteroRankConfig
    client_rank: int | None = None  # set by for_client; None: the global rank (the server, a single-task trial)

    def rank_of(self, slot: int) -> int:
        return self.config.client_ranks[slot % len(self.config.client_ranks)]

    def for_client(self, slot: int, n_clients: int) -> "HeteroRankLoRA":
        m = copy.deepcopy(self)
        m.client_rank = self.rank_of(slot)
        return m

    def make_layer(self, base) -> LoraLinear:
        c = self.config
        r = self.client_rank or c.rank
        return LoraLinear(self.make_base(base), r, self.scale(), c.dropout, c.init, c.kernel,
                          variant=self.variant(), zero_init=c.zero_init)  # scale alpha / rank for every client


def truncate(state: State, r: int) -> State:
    """The rank-r leading part of every adapter: B[:, :r], A[:r] (HetLoRA's truncation)."""
    out = dict(state)
    for p in layer_prefixes(state):
        out[f"{p}.lora_A"] = state[f"{p}.lora_A"][:r].clone()
        out[f"{p}.lora_B"] = state[f"{p}.lora_B"][:, :r].clone()
    return out


def pad(state: State, r: int) -> State:
    """Every adapter zero-padded to rank r: B A unchanged (HetLoRA's padding)."""
    out = dict(state)
    for p in layer_prefixes(state):
        a, b = state[f"{p}.lora_A"], state[f"{p}.lora_B"]
        out[f"{p}.lora_A"] = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])], 0)
        out[f"{p}.lora_B"] = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], 1)
    return out


def svd_factors(delta: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, relative error) with scale B A the best rank-r approximation of delta (Eckart-Young):
    B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T; the error is ||delta - s B A||_F / ||delta||_F."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    root = torch.sqrt(S[:r] / scale)
    total = float((S ** 2).sum())
    err = float((S[r:] ** 2).sum() / total) ** 0.5 if total > 0 else 0.0
    return U[:, :r] * root[None], root[:, None] * Vh[:r], err
