"""FFA-LoRA: "Improving LoRA in Privacy-preserving Federated Learning" (Sun et al., arXiv 2403.12313).

Every client freezes the same randomly initialised A (drawn from the shared seed) and trains only
B (and the task head). FedAvg then aggregates exactly: Σ_i w_i s B_i A = s (Σ_i w_i B_i) A, where
FedIT's mean(B) mean(A) is not the mean of the products (sec. 3 of FFA-LoRA: "discordance" of
the factors). Half the parameters travel, and with A fixed the noise of DP-SGD does not get
amplified through the product B A (sec. 4), which is why FFA-LoRA fits differential privacy.
A is never sent: each client rebuilds it from the seed, as the paper's clients do.

With `dp_noise_multiplier` > 0 each client trains with DP-SGD (Abadi et al., arXiv 1607.00133)
through opacus: per-example gradients of B and the head (opacus' GradSampleModule), each clipped
to `dp_max_grad_norm`, summed, Gaussian noise of standard deviation noise_multiplier x max_grad_norm
added, divided by the batch (opacus' DPOptimizer.pre_step); the clients scenario accounts the
privacy budget epsilon at `dp_delta` with opacus' RDP accountant over every step each client took.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.federated.base import FederatedLoRA, State
from lorabench.methods.lora import LoraConfig, LoraLinear


@dataclass
class FFALoraConfig(LoraConfig):
    dp_noise_multiplier: float = option(0.0, "DP-SGD noise multiplier sigma (noise std = sigma x dp_max_grad_norm); "
                                             "0 = no differential privacy", low=0.0)
    dp_max_grad_norm: float = option(1.0, "DP-SGD per-example gradient clipping norm C", low=0.0)
    dp_delta: float = option(1e-5, "delta of the (epsilon, delta) privacy budget the clients scenario reports",
                             low=0.0, high=1.0)


class FFALoRA(FederatedLoRA):
    name = "ffa-lora"
    title = "Improving LoRA in privacy-preserving federated learning"
    paper = "2403.12313"
    config_cls = FFALoraConfig
    default_lr = 1e-3  # only B trains: a larger rate than LoRA's, as for LoRA-FA
    mechanism_metrics = {"dp_steps": "optimizer steps taken with DP-SGD (0 without differential privacy)",
                         "dp_noise_multiplier": "the noise multiplier sigma used",
                         "dp_clipped_fraction": "share of per-example gradients whose norm exceeded dp_max_grad_norm"}

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.zero_init != "B":
            raise ValueError("ffa-lora freezes A, so A must be the random factor: zero_init must be 'B'")

    def freeze_adapter(self, layer: LoraLinear) -> None:
        layer.lora_A.requires_grad_(False)  # sec. 3 of FFA-LoRA: A fixed at its random init on every client

    # -- DP-SGD through opacus ----------------------------------------------------------------
    def on_train_begin(self, state: TrainState) -> None:
        self._dp, self._dp_steps, self._clipped, self._examples = None, 0, 0, 0
        if self.config.dp_noise_multiplier > 0:
            from opacus import GradSampleModule
            state.model.train()
            # hooks on the model's own modules: per-example gradients of every trained tensor (the LoRA
            # layers through opacus' functorch fallback), also when the model itself is called
            self._gsm = GradSampleModule(state.model)

    def on_after_backward(self, state: TrainState) -> None:
        if self.config.dp_noise_multiplier <= 0:
            return
        from opacus.optimizers import DPOptimizer
        c = self.config
        if self._dp is None:
            self._dp = DPOptimizer(state.optimizer, noise_multiplier=c.dp_noise_multiplier,
                                   max_grad_norm=c.dp_max_grad_norm, expected_batch_size=len(state.batch["labels"]))
        params = [p for g in state.optimizer.param_groups for p in g["params"] if p.requires_grad]
        norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params], 1).norm(dim=1)  # per example
        self._clipped += int((norms > c.dp_max_grad_norm).sum())
        self._examples += norms.numel()
        self._dp.pre_step()  # clip each example to C, sum, add N(0, sigma^2 C^2), divide by the batch -> p.grad
        self._dp_steps += 1

    def on_step_end(self, state: TrainState) -> None:
        if self._dp is not None:
            for p in self._dp.params:  # per-example state of this step; p.grad was used by the step
                p.grad_sample, p.summed_grad = None, None

    def on_train_end(self, state: TrainState) -> None:
        if getattr(self, "_gsm", None) is not None:
            self._gsm.to_standard_module()  # remove opacus' hooks and attributes: an ordinary module again
            self._gsm = None
        state.metrics.update({"dp_steps": self._dp_steps, "dp_noise_multiplier": self.config.dp_noise_multiplier,
                              "dp_clipped_fraction": round(self._clipped / self._examples, 6) if self._examples else 0.0})

    def frozen_keys(self, global_state: State) -> list[str]:
        return [k for k in global_state if k.endswith(".lora_A")]  # never sent: rebuilt from the shared seed
