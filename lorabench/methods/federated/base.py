"""What a federated LoRA method is: a LoRA method plus the rules of a round (survey arXiv 2407.11046, sec. 6).

A federated method trains, on each client, like any lorabench method (it *is* a `LoRA` subclass: a
single-task trial runs its client-side training alone). The clients scenario
(`lorabench/harness/clients.py`, on Flower's simulation engine) drives a round through these hooks:

- `for_client(slot, n_clients)`: the method as client `slot` runs it (HetLoRA and FlexLoRA give
  clients different ranks);
- `download(global_state, slot, n_clients)`: the tensors the server sends that client;
- `upload(model)`: the tensors the client sends back after its local steps (the trained ones);
- `personal_state(model)`: the tensors a client keeps for its next round and never sends (pFedLoRA's
  local model; none for the others), kept in Flower's per-node `Context.state`;
- `aggregate(global_state, uploads, weights, slots, n_clients)`: the server's rule, returning the
  new global state and the weights it actually used;
- `delta_weights(state)`: the dense update ΔW = s B A of each adapted layer that a state stands for,
  from which the scenario measures the aggregation's exactness: the error between the aggregated
  update and the exact weighted average of the clients' products Σ_i w_i s B_i A_i.

`FedIT` (FedAvg of the factors, arXiv 2305.05644) is this base class with nothing overridden:
A and B are averaged separately, so the aggregated product mean(B) mean(A) is not the mean of the
products (inexact; the report shows by how much).
"""
from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import nn

from lorabench.methods.lora import LoRA, LoraLinear

State = dict[str, torch.Tensor]


def layer_prefixes(state: State) -> list[str]:
    """The adapted layers of a state: every prefix that has both `.lora_A` and `.lora_B`."""
    a = {k[: -len(".lora_A")] for k in state if k.endswith(".lora_A")}
    return sorted(p for p in a if f"{p}.lora_B" in state)


def weighted_mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, w in zip(tensors, weights):
        out += w * t.float()
    return out.to(tensors[0].dtype)


def normalised(weights: list[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights must have a positive sum, got {weights}")
    return [float(w) / total for w in weights]


class FederatedLoRA(LoRA):
    """FedIT: FedAvg of the LoRA factors (Zhang et al., "Towards Building the Federated GPT:
    Federated Instruction Tuning", arXiv 2305.05644). The base of every federated method."""

    name = "fedit"
    title = "Towards Building the Federated GPT: Federated Instruction Tuning"
    paper = "2305.05644"
    family = "federated"
    # Quantities a federated method records per round in the clients scenario (the record's
    # `federated.rounds`), beside the aggregation error and bytes every method gets.
    round_metrics: ClassVar[dict[str, str]] = {}

    # -- the client ------------------------------------------------------------------------------
    def for_client(self, slot: int, n_clients: int) -> "FederatedLoRA":
        """The method as client `slot` of `n_clients` runs it (the same for every client here)."""
        return copy.deepcopy(self)

    def upload(self, model: nn.Module) -> State:
        """What a client sends after its local steps: the tensors it trained (LoRA factors and the head)."""
        return {n: p.detach().clone() for n, p in self.trainable_parameters(model)}

    def personal_state(self, model: nn.Module) -> State:
        """Tensors a client keeps between rounds and never sends (pFedLoRA's local model); none here."""
        return {}

    @torch.no_grad()
    def load_state(self, model: nn.Module, state: State) -> None:
        """Copy `state` into the model's tensors of the same names (a partial state is fine)."""
        own = dict(model.named_parameters())
        own.update(dict(model.named_buffers()))
        for k, v in state.items():
            if k not in own:
                raise ValueError(f"{self.name}: the model has no tensor {k!r} to load the server's state into")
            if own[k].shape != v.shape:
                raise ValueError(f"{self.name}: {k} has shape {tuple(own[k].shape)} here, {tuple(v.shape)} sent")
            own[k].copy_(v)

    # -- the server ------------------------------------------------------------------------------
    def initial_state(self, model: nn.Module) -> State:
        """The global state before round 1: every adapter tensor and the head, as applied (seeded)."""
        return {k: v.clone() for k, v in self.adapter_state_dict(model).items()}

    def download(self, global_state: State, slot: int, n_clients: int) -> State:
        """What the server sends client `slot`: every tensor a client trains (frozen tensors, such
        as FFA-LoRA's A, each client rebuilds from the shared seed and never receives)."""
        return {k: v for k, v in global_state.items() if k in self._trained_keys(global_state)}

    def _trained_keys(self, global_state: State) -> set[str]:
        return set(global_state) - set(self.frozen_keys(global_state))

    def frozen_keys(self, global_state: State) -> list[str]:
        """Keys of the global state that clients never train (none for FedIT)."""
        return []

    def aggregate(self, global_state: State, uploads: list[State], weights: list[float], slots: list[int],
                  n_clients: int) -> tuple[State, list[float]]:
        """FedAvg of every uploaded tensor, each factor on its own (FedIT, sec. 3 of arXiv 2305.05644):
        A <- Σ w_i A_i, B <- Σ w_i B_i. The returned weights are those used (normalised)."""
        w = normalised(weights)
        new = dict(global_state)
        for k in uploads[0]:
            new[k] = weighted_mean([u[k] for u in uploads], w)
        return new, w

    def round_summary(self, slots: list[int]) -> dict:
        """The method's `round_metrics` for the round just aggregated (clients `slots` took part)."""
        return {}

    # -- exactness -------------------------------------------------------------------------------
    def delta_scale(self) -> float:
        """The s of ΔW = s B A for every client (alpha / r)."""
        return self.scale()

    def delta_weights(self, state: State) -> dict[str, torch.Tensor]:
        """ΔW = s B A of each adapted layer of a (global or client) state."""
        s = self.delta_scale()
        return {p: s * (state[f"{p}.lora_B"].float() @ state[f"{p}.lora_A"].float()) for p in layer_prefixes(state)}

    def global_delta_weights(self, global_state: State) -> dict[str, torch.Tensor]:
        """The update the global model applies (FlexLoRA keeps it as a dense matrix)."""
        return self.delta_weights(global_state)

    @torch.no_grad()
    def load_global(self, model: nn.Module, global_state: State) -> None:
        """Make an applied model the global model (for the server's evaluation)."""
        self.load_state(model, global_state)

    def lora_layer_names(self, model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
