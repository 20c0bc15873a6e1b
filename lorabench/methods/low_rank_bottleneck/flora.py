"""FLoRA: Low-rank adapters are secretly gradient compressors (Hao, Cao, Mou, arXiv 2402.03293).

With A frozen at a random Gaussian, training only B is W's gradient descent with the gradient
compressed by a random projection: dL/dB = s G A^T, and the update of W = s B A is G A^T A with
E[A^T A] = I (sec. 3). FLoRA resamples the projection every `resample_every` steps so that the
sum of the updates is not confined to one rank-r subspace: merge s B A into W, draw a new A, set
B = 0, and carry the compressed momentum over to the new subspace, M <- M A_old A_new^T
(Algorithm 2). Only B (d x r per layer) and its optimizer state are trained and stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState, interval_in_budget
from lorabench.methods.low_rank_bottleneck.layer import HighRankLoRA, HighRankVariant, high_rank_layers
from lorabench.methods.lora import LoRA, LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant


class FloraVariant(HighRankVariant):
    """HighRankVariant whose A is a buffer (a random projection), not a parameter."""

    def init(self, layer: LoraLinear) -> None:
        super().init(layer)
        a = layer.lora_A.detach()
        del layer.lora_A
        layer.register_buffer("lora_A", a)
        self.reinit_low_rank(layer)

    @torch.no_grad()
    def reinit_low_rank(self, layer: LoraLinear) -> None:
        layer.lora_A.normal_(std=layer.rank ** -0.5)  # A (r, k) ~ N(0, 1/r): E[A^T A] = I_k
        layer.lora_B.zero_()


@dataclass
class FloraConfig(LoraConfig):
    resample_every: int | None = option(
        None, "draw a new random projection A every this many steps (kappa of Algorithm 2; the paper uses "
              "hundreds of steps on long runs); None = a quarter of the trial's steps; must be below the steps", low=1)
    transfer_momentum: bool = option(True, "carry B's first Adam moment to the new subspace (M A_old A_new^T, "
                                           "Algorithm 2); false = start it from zero")

    def __post_init__(self):
        super().__post_init__()
        if self.zero_init != "B":
            raise ValueError("flora draws A at random and starts B at zero: zero_init must be 'B'")
        if self.kernel == "fused":
            raise ValueError("flora trains only B; the fused lora_linear kernel expects A to be trained: "
                             "use kernel='reference'")


class FLoRA(HighRankLoRA, LoRA):
    name = "flora"
    title = "FLoRA: Low-Rank Adapters Are Secretly Gradient Compressors"
    paper = "2402.03293"
    family = "low-rank-bottleneck"
    config_cls = FloraConfig
    mechanism_metrics = {
        "resamples": "new random projections A drawn (each after merging s B A into W)",
        "resample_every": "the resampling period kappa in steps this trial used",
        "update_rank_mean": "mean numerical rank of the whole update W - W0 over the layers",
    }

    def variant(self) -> LoraVariant:
        return FloraVariant()

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().adapter_state_dict(model)
        state.update({n: b.detach() for n, b in model.named_buffers() if n.endswith("lora_A")})
        return state

    @torch.no_grad()
    def resample(self, state: TrainState) -> None:
        for m in high_rank_layers(state.model):
            a_old = m.lora_A.clone()
            m.variant.merge_low_rank(m)    # W <- W + s B A_old
            m.variant.reinit_low_rank(m)   # A_new ~ N(0, 1/r), B = 0
            st = state.optimizer.state.get(m.lora_B) if state.optimizer is not None else None
            if st and "exp_avg" in st:
                if self.config.transfer_momentum:
                    st["exp_avg"].copy_(st["exp_avg"] @ a_old @ m.lora_A.T)  # M A_old A_new^T
                else:
                    st["exp_avg"].zero_()
        self.resamples += 1

    def on_train_begin(self, state: TrainState) -> None:
        self.resamples = 0
        # a resample after the last step would change nothing: the period must fit in steps - 1
        self.every = interval_in_budget(self.config.resample_every, 0.25, state.total_steps - 1, "resample_every")
        state.metrics["resample_every"] = self.every

    def on_step_end(self, state: TrainState) -> None:
        done = state.step + 1
        if done % self.every == 0 and done < state.total_steps:
            self.resample(state)

    def on_train_end(self, state: TrainState) -> None:
        state.metrics["resamples"] = self.resamples
        self.report_rank(state)
