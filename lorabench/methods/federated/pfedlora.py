"""pFedLoRA: "pFedLoRA: Model-Heterogeneous Personalized Federated Learning with LoRA Tuning" (Yi et al.,
arXiv 2310.13283).

Each client keeps a *local model* of its own and carries a *homogeneous small adapter* that every client
shares the shape of (sec. 4 of pFedLoRA). Only the adapter travels: the server aggregates the clients'
adapters by FedAvg into the global adapter and sends it back; the local models never leave their clients.
Each round a client trains by *iterative training* (sec. 4.2): with the received global adapter frozen it
first trains its local model (global knowledge flows into the local model), then, with the local model
frozen, it trains the adapter (local knowledge flows into the adapter it uploads).

Here every client starts from the same pretrained backbone, so a client's local model is the frozen
backbone plus a private LoRA adapter of its own rank (`local_ranks`, cycled over the clients: local models
of different sizes, the model heterogeneity available on one architecture) and the task head; the shared
homogeneous adapter is a rank-`rank` LoRA on the same layers: h = W0 x + s B A x + s_l B_l A_l x. The
local part persists on the client between rounds (Flower's per-node `Context.state`), is never sent and
never aggregated; the personalised accuracy (each client's model on its own test data, `personal_score`)
is the method's objective. The global model the server scores is the backbone with the global adapter
and the initial head (no client's local part): a reference, not pFedLoRA's aim.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState
from lorabench.methods.federated.base import FederatedLoRA, State
from lorabench.methods.lora import LoraConfig, LoraLinear, LoraVariant

LOCAL = (".local_A", ".local_B")


@dataclass
class PFedLoraConfig(LoraConfig):
    local_ranks: list[int] = option(default_factory=lambda: [4, 8], help=(
        "rank of each client's private local adapter, cycled over the clients (client i gets local_ranks[i % len]): "
        "local models of different sizes"))
    local_ratio: float = option(0.5, "iterative training: share of a client's local steps that train its local model "
                                     "(global adapter frozen) before the rest train the global adapter (local model "
                                     "frozen)", low=0.0, high=1.0)

    def __post_init__(self):
        super().__post_init__()
        if not self.local_ranks or any(r < 1 for r in self.local_ranks):
            raise ValueError(f"local_ranks must be a non-empty list of ranks >= 1, got {self.local_ranks}")


class WithLocalAdapter(LoraVariant):
    """h = W0 x + s B A x (the shared adapter, eq. (3) of LoRA) + s_l B_l A_l x (the client's private one)."""

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(layer, x)
        return out + F.linear(F.linear(x, layer.local_A), layer.local_B) * layer.local_scale

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return super().delta_weight(layer) + layer.local_scale * (layer.local_B @ layer.local_A)


class PFedLoRA(FederatedLoRA):
    name = "pfedlora"
    title = "pFedLoRA: Model-heterogeneous personalized federated learning with LoRA tuning"
    paper = "2310.13283"
    config_cls = PFedLoraConfig
    mechanism_metrics = {"local_rank": "rank of this client's private local adapter",
                         "switch_step": "the step at which iterative training turned from the local model to the "
                                        "global adapter",
                         "local_share": "||ΔW_local||_F / (||ΔW_local||_F + ||ΔW_global||_F) summed over layers: how much "
                                        "of the client's update is its own"}
    round_metrics = {"local_ranks": "local adapter rank of each client sampled this round",
                     "resumed_local": "share of the round's clients that started from the local model they kept "
                                      "(Flower's Context.state; 0 in a client's first round)"}
    client_slot: int | None = None

    def local_rank(self) -> int:
        r = self.config.local_ranks
        return r[(self.client_slot or 0) % len(r)]

    def for_client(self, slot: int, n_clients: int) -> "PFedLoRA":
        m = copy.deepcopy(self)
        m.client_slot = slot
        return m

    def variant(self) -> LoraVariant:
        return WithLocalAdapter()

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        super().apply(model, ctx)
        self.head_modules = list(ctx.head_modules)
        r = self.local_rank()
        for layer in self.lora_layers(model):
            a = torch.empty(r, layer.in_features, dtype=layer.lora_A.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            layer.local_A = nn.Parameter(a)
            layer.local_B = nn.Parameter(torch.zeros(layer.out_features, r, dtype=layer.lora_B.dtype))
            layer.local_scale = self.config.alpha / r
        return model

    # -- what is local, what is shared --------------------------------------------------------------
    @staticmethod
    def is_shared(name: str) -> bool:
        return name.endswith((".lora_A", ".lora_B"))

    def upload(self, model: nn.Module) -> State:
        """The homogeneous adapter only (sec. 4 of pFedLoRA): the local model stays on the client."""
        return {n: p.detach().clone() for n, p in self.trainable_parameters(model) if self.is_shared(n)}

    def personal_state(self, model: nn.Module) -> State:
        """What the client keeps between rounds: its local adapter and head (Flower's Context.state)."""
        return {n: p.detach().clone() for n, p in self.trainable_parameters(model) if not self.is_shared(n)}

    def initial_state(self, model: nn.Module) -> State:
        return {n: p.detach().clone() for n, p in self.trainable_parameters(model) if self.is_shared(n)}

    # -- iterative training (sec. 4.2) ---------------------------------------------------------------
    def on_train_begin(self, state: TrainState) -> None:
        self.switch_step = int(round(self.config.local_ratio * state.total_steps))

    def on_after_backward(self, state: TrainState) -> None:
        local_phase = state.step < self.switch_step
        for n, p in self.trainable_parameters(state.model):
            if self.is_shared(n) == local_phase:  # the frozen side: no gradient, AdamW leaves it as it is
                p.grad = None

    @torch.no_grad()
    def on_train_end(self, state: TrainState) -> None:
        loc = glob = 0.0
        for layer in self.lora_layers(state.model):
            loc += float(torch.linalg.matrix_norm(layer.local_scale * layer.local_B @ layer.local_A))
            glob += float(torch.linalg.matrix_norm(layer.scale * layer.lora_B @ layer.lora_A))
        state.metrics.update({"local_rank": self.local_rank(), "switch_step": self.switch_step,
                              "local_share": round(loc / (loc + glob), 6) if loc + glob > 0 else 0.0})

    def round_summary(self, slots: list[int]) -> dict:
        r = self.config.local_ranks
        return {"local_ranks": [r[s % len(r)] for s in slots]}
