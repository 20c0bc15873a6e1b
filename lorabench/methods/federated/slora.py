"""SLoRA: "SLoRA: Federated Parameter Efficient Fine-Tuning of Language Models" (Babakniya et al., arXiv 2308.06522).

Under strongly non-IID data LoRA from its usual start (A random, B = 0) falls behind full fine-tuning;
SLoRA gives LoRA a data-driven start in two stages (sec. 4 of SLoRA):

- **stage 1** (`stage1_rounds` federated rounds): sparse fine-tuning of the full weights. Each adapted
  weight W0 (d, k) gets a fixed random mask of `density` d k entries (the same on every client: drawn
  from the shared seed and the layer's name, so the mask is never sent); clients train only the
  masked entries, W = W0 + ΔW_s with ΔW_s zero off the mask, and send those values; the server
  averages them (FedAvg, exact: the update is linear in the values).
- **the switch**: the accumulated sparse update ΔW_s of each layer is decomposed, ΔW_s = U S V^T, and
  its rank-r part initialises LoRA, s B A = U_r S_r V_r^T (B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T);
  the frozen weight stays W0, so what the rank-r SVD leaves out of ΔW_s is dropped. The share of ΔW_s's
  energy the SVD keeps, Σ_{i<=r} S_i^2 / Σ_i S_i^2 over every layer, is recorded (`energy_retained`).
- **stage 2**: LoRA from that start, the factors FedAvg'd as FedIT's (inexact).

Per round the record carries the stage, the switch round, the mask's density and the SVD's retained
energy (`round_metrics`). As a single-task trial (one client alone) SLoRA runs stage 1 for
`stage1_ratio` of the steps, switches, and trains LoRA for the rest.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState
from lorabench.methods.federated.base import FederatedLoRA, State, normalised, weighted_mean
from lorabench.methods.federated.hetero import svd_factors
from lorabench.methods.lora import LoraConfig, LoraLinear, LoraVariant

SPARSE = ".sparse_values"


@dataclass
class SLoraConfig(LoraConfig):
    density: float = option(0.01, "stage 1: share of each adapted weight's entries in the fixed random mask that "
                                  "clients fine-tune (the paper's ~1%)", low=1e-6, high=1.0)
    stage1_rounds: int = option(2, "federated rounds of stage 1 (sparse fine-tuning) before LoRA starts from the SVD "
                                   "of the accumulated sparse update", low=1)
    stage1_ratio: float = option(0.5, "single-task trial only: share of the steps spent in stage 1", low=0.0, high=1.0)


class SparseDelta(LoraVariant):
    """W0 + ΔW_s + s B A, ΔW_s the masked entries `sparse_values` at the flat positions `sparse_index`."""

    @staticmethod
    def dense(layer: LoraLinear) -> torch.Tensor:
        d = torch.zeros(layer.out_features * layer.in_features, dtype=layer.sparse_values.dtype,
                        device=layer.sparse_values.device)
        return d.index_put((layer.sparse_index,), layer.sparse_values).view(layer.out_features, layer.in_features)

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        if not layer.sparse_active:  # stage 2: ΔW_s is zero
            return super().forward(layer, x)
        out = F.linear(x, layer.base.weight + self.dense(layer), layer.base.bias)  # stage 1: (W0 + ΔW_s) x
        return out + F.linear(F.linear(x, layer.lora_A), layer.lora_B) * layer.scale

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return super().delta_weight(layer) + self.dense(layer)


def mask_index(seed: int, name: str, numel: int, density: float) -> torch.Tensor:
    """The fixed random mask of one layer (flat positions, sorted): the same on the server and every client."""
    tag = hashlib.sha256(f"slora:{seed}:{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(tag[:8], "little"))
    nnz = max(1, int(round(density * numel)))
    return torch.randperm(numel, generator=g)[:nnz].sort().values


class SLoRA(FederatedLoRA):
    name = "slora"
    title = "SLoRA: Federated parameter efficient fine-tuning of language models"
    paper = "2308.06522"
    config_cls = SLoraConfig
    mechanism_metrics = {"stage": "the stage the client ended in: 1 sparse fine-tuning, 2 LoRA",
                         "mask_density": "share of the adapted weights' entries in the sparse mask",
                         "switch_step": "single-task trial: the step at which LoRA started from the SVD (-1: no switch)",
                         "energy_retained": "share of the sparse update's energy kept by the rank-r SVD at the switch "
                                           "(-1: no switch)"}
    round_metrics = {"stage": "the stage this round trained in (1 sparse, 2 LoRA)",
                     "switch_round": "the round after which LoRA started from the SVD of the sparse update (None: not yet)",
                     "mask_density": "share of the adapted weights' entries clients fine-tune in stage 1",
                     "energy_retained": "share of the accumulated sparse update's energy the rank-r SVD kept"}

    def __init__(self, config=None):
        super().__init__(config)
        self.masks: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self.rounds_done = 0
        self.switch_round: int | None = None
        self.energy: float | None = None
        self.stage_from_server: int | None = None  # a client: the stage the server's state is in
        self.last_stage = 1

    def variant(self) -> LoraVariant:
        return SparseDelta()

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        super().apply(model, ctx)
        numel = total = 0
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLinear):
                idx = mask_index(ctx.seed, name, layer.out_features * layer.in_features, self.config.density)
                self.masks[name], self.shapes[name] = idx, (layer.out_features, layer.in_features)
                layer.register_buffer("sparse_index", idx, persistent=False)
                layer.sparse_values = nn.Parameter(torch.zeros(len(idx), dtype=layer.lora_A.dtype))
                layer.sparse_active = True
                layer.lora_A.requires_grad_(False)  # stage 1: only the masked entries (and the head) train
                layer.lora_B.requires_grad_(False)
                numel += len(idx)
                total += layer.out_features * layer.in_features
        self.density = numel / total
        return model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        # every tensor either stage trains: a frozen one has no gradient and AdamW skips it, so the
        # single-task trial's switch (on_step_begin) needs no new optimizer
        params = [p for _, p in self.trainable_parameters(model)]
        seen = {id(p) for p in params}
        for layer in self.lora_layers(model):
            params += [p for p in (layer.lora_A, layer.lora_B) if id(p) not in seen]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    # -- the switch -------------------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def set_stage(model: nn.Module, stage: int) -> None:
        for layer in model.modules():
            if isinstance(layer, LoraLinear):
                layer.sparse_active = stage == 1
                layer.sparse_values.requires_grad_(stage == 1)
                layer.lora_A.requires_grad_(stage == 2)
                layer.lora_B.requires_grad_(stage == 2)
                if stage == 2:
                    layer.sparse_values.zero_()

    def svd_init(self, deltas: dict[str, torch.Tensor]) -> tuple[State, float]:
        """LoRA factors whose s B A is the rank-r SVD of each layer's sparse update, and the energy kept."""
        out, kept, total = {}, 0.0, 0.0
        s = self.delta_scale()
        for p, d in deltas.items():
            b, a, err = svd_factors(d, self.config.rank, s)
            energy = float((d.float() ** 2).sum())
            kept += energy * (1 - err ** 2)
            total += energy
            out[f"{p}.lora_B"], out[f"{p}.lora_A"] = b.to(d.dtype), a.to(d.dtype)
        return out, (kept / total if total > 0 else 1.0)

    def on_train_begin(self, state: TrainState) -> None:
        self.switch_step, self.switch_energy = -1, -1.0
        self._switch_at = None
        if self.stage_from_server is None:  # a single-task trial: both stages in this one run
            self._switch_at = int(round(self.config.stage1_ratio * state.total_steps))

    @torch.no_grad()
    def on_step_begin(self, state: TrainState) -> None:
        if self._switch_at is None or state.step != self._switch_at:
            return
        layers = {n: m for n, m in state.model.named_modules() if isinstance(m, LoraLinear)}
        factors, self.switch_energy = self.svd_init({n: SparseDelta.dense(m) for n, m in layers.items()})
        for n, m in layers.items():
            if float(m.sparse_values.abs().sum()) > 0:  # a layer whose sparse update is zero keeps LoRA's init
                m.lora_B.copy_(factors[f"{n}.lora_B"])
                m.lora_A.copy_(factors[f"{n}.lora_A"])
        self.set_stage(state.model, 2)
        self.switch_step = state.step

    def on_train_end(self, state: TrainState) -> None:
        stage = self.stage_from_server or (2 if self.switch_step >= 0 else 1)
        state.metrics.update({"stage": stage, "mask_density": round(self.density, 6), "switch_step": self.switch_step,
                              "energy_retained": round(self.switch_energy, 6)})

    # -- the rounds -------------------------------------------------------------------------------
    def load_state(self, model: nn.Module, state: State) -> None:
        stage = 1 if any(k.endswith(SPARSE) for k in state) else 2
        self.set_stage(model, stage)
        self.stage_from_server = stage
        super().load_state(model, state)

    def initial_state(self, model: nn.Module) -> State:
        return {n: p.detach().clone() for n, p in self.trainable_parameters(model)}  # stage 1: sparse values, head

    def aggregate(self, global_state, uploads, weights, slots, n_clients):
        w = normalised(weights)
        new = dict(global_state)
        for k in uploads[0]:
            new[k] = weighted_mean([u[k] for u in uploads], w)  # FedAvg: exact for the sparse values
        self.rounds_done += 1
        self.last_stage = 1 if any(k.endswith(SPARSE) for k in uploads[0]) else 2
        if self.last_stage == 1 and self.rounds_done >= self.config.stage1_rounds:
            deltas = self.sparse_deltas(new)
            factors, self.energy = self.svd_init(deltas)
            new = {k: v for k, v in new.items() if not k.endswith(SPARSE)}
            new.update(factors)  # stage 2 starts from the SVD; W0 stays, the sparse update is dropped
            self.switch_round = self.rounds_done
        return new, w

    def round_summary(self, slots: list[int]) -> dict:
        return {"stage": self.last_stage, "switch_round": self.switch_round, "mask_density": round(self.density, 6),
                "energy_retained": None if self.energy is None else round(self.energy, 6)}

    def sparse_deltas(self, state: State) -> dict[str, torch.Tensor]:
        """ΔW_s (d, k) of each layer from a state's masked values (the masks are the method's, from apply)."""
        out = {}
        for k, v in state.items():
            if k.endswith(SPARSE):
                p = k[: -len(SPARSE)]
                shape = self.shapes[p]
                d = torch.zeros(shape[0] * shape[1], dtype=torch.float32)
                out[p] = d.index_put((self.masks[p],), v.float()).view(shape)
        return out

    def delta_weights(self, state: State) -> dict[str, torch.Tensor]:
        if any(k.endswith(SPARSE) for k in state):
            return self.sparse_deltas(state)
        return super().delta_weights(state)
