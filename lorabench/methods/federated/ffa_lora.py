"""FFA-LoRA: "Improving LoRA in Privacy-preserving Federated Learning" (Sun et al., arXiv 2403.12313).

Every client freezes the same randomly initialised A (drawn from the shared seed) and trains only
B (and the task head). FedAvg then aggregates exactly: Σ_i w_i s B_i A = s (Σ_i w_i B_i) A, where
FedIT's mean(B) mean(A) is not the mean of the products (sec. 3 of FFA-LoRA: "discordance" of
the factors). Half the parameters travel, and with A fixed the noise of DP-SGD does not get
amplified through the product B A (sec. 4), which is why FFA-LoRA fits differential privacy.
A is never sent: each client rebuilds it from the seed, as the paper's clients do.
"""
from __future__ import annotations

from lorabench.methods.federated.base import FederatedLoRA, State
from lorabench.methods.lora import LoraLinear


class FFALoRA(FederatedLoRA):
    name = "ffa-lora"
    title = "Improving LoRA in privacy-preserving federated learning"
    paper = "2403.12313"
    default_lr = 1e-3  # only B trains: a larger rate than LoRA's, as for LoRA-FA

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.zero_init != "B":
            raise ValueError("ffa-lora freezes A, so A must be the random factor: zero_init must be 'B'")

    def freeze_adapter(self, layer: LoraLinear) -> None:
        layer.lora_A.requires_grad_(False)  # sec. 3 of FFA-LoRA: A fixed at its random init on every client

    def frozen_keys(self, global_state: State) -> list[str]:
        return [k for k in global_state if k.endswith(".lora_A")]  # never sent: rebuilt from the shared seed
