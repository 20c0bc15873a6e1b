"""PrivateLoRA: "PrivateLoRA For Efficient Privacy Preserving LLM" (Wang et al., arXiv 2311.14030).

PrivateLoRA splits the computation: the heavy frozen model (W0, and the adapter's frozen projections A and B)
stays on the cloud, and only a small square matrix M (r, r) lives and trains on the device, with the private
data: h = W0 x + s B M A x (sec. 3 of PrivateLoRA). Per token and adapted layer the cloud sends the device
A x (r values) and gets M A x back (r values), instead of activations of the hidden size: what crosses the
network is 2 r numbers per layer, and the device never holds W0.

Here A and B are random and frozen (drawn from the shared seed, never sent), M starts at zero (the model is
unchanged at step 0) and is the only adapter tensor that trains. In the clients scenario the device's M (and
the head) is what a client uploads, and FedAvg of M is **exact**: s B (Σ_i w_i M_i) A = Σ_i w_i s B M_i A.
Measured, not built: the split itself (the cloud and the device as two machines exchanging activations):
the trial records the numbers per token that the split would send each way (`activation_floats_per_token`,
2 r per adapted layer) beside those of sending the layer's input and output (`hidden_floats_per_token`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.methods.base import TrainState
from lorabench.methods.federated.base import FederatedLoRA, State, layer_prefixes
from lorabench.methods.lora import LoraLinear, LoraVariant


class DeviceMatrix(LoraVariant):
    """h = W0 x + s B M A x: A (r, k) and B (d, r) frozen random on the cloud, M (r, r) on the device (zero init)."""

    @torch.no_grad()
    def init(self, layer: LoraLinear) -> None:
        nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))  # B random too: M = 0 keeps B M A = 0 at step 0
        layer.lora_M = nn.Parameter(torch.zeros(layer.rank, layer.rank, dtype=layer.lora_A.dtype,
                                                device=layer.lora_A.device))

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        down = F.linear(x, layer.lora_A)  # cloud -> device: r values per token
        return layer.base(x) + F.linear(F.linear(down, layer.lora_M), layer.lora_B) * layer.scale  # device -> cloud: r

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return layer.scale * (layer.lora_B @ layer.lora_M @ layer.lora_A)


class PrivateLoRA(FederatedLoRA):
    name = "privatelora"
    title = "PrivateLoRA for efficient privacy preserving LLM"
    paper = "2311.14030"
    default_lr = 1e-3  # only an r x r matrix per layer trains, as VeRA's few parameters: a larger rate than LoRA's
    mechanism_metrics = {"activation_floats_per_token": "numbers per token the split would send between cloud and "
                                                        "device, both ways, summed over adapted layers (2 r each)",
                         "hidden_floats_per_token": "numbers per token if each adapted layer's input and output "
                                                    "crossed instead (k + d each)",
                         "device_params": "adapter parameters on the device (the r x r matrices M)"}

    def variant(self) -> LoraVariant:
        return DeviceMatrix()

    def freeze_adapter(self, layer: LoraLinear) -> None:
        layer.lora_A.requires_grad_(False)  # A and B stay on the cloud, frozen
        layer.lora_B.requires_grad_(False)

    def on_train_end(self, state: TrainState) -> None:
        layers = self.lora_layers(state.model)
        state.metrics.update({"activation_floats_per_token": sum(2 * m.rank for m in layers),
                              "hidden_floats_per_token": sum(m.in_features + m.out_features for m in layers),
                              "device_params": sum(m.lora_M.numel() for m in layers)})

    def frozen_keys(self, global_state: State) -> list[str]:
        return [k for k in global_state if k.endswith((".lora_A", ".lora_B"))]  # rebuilt from the shared seed

    def delta_weights(self, state: State) -> dict[str, torch.Tensor]:
        s = self.delta_scale()
        return {p: s * (state[f"{p}.lora_B"].float() @ state[f"{p}.lora_M"].float() @ state[f"{p}.lora_A"].float())
                for p in layer_prefixes(state)}
