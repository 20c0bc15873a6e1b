"""O-LoRA: orthogonal subspace learning for language-model continual learning (Wang et al., arXiv 2310.14152).

Each task t trains a new LoRA adapter B_t A_t; the adapters of past tasks are frozen and kept in the
model (here folded into the frozen weights, W0 + Σ_{s<t} s B_s A_s, which computes the same), and the
rows of A_t (the input directions the new update reads) are pushed away from those of every past A_s
by the orthogonality loss of the paper's sec. 3.2:

    O_{s,t} = A_s A_t^T  (r x r),   L_orth(A_s, A_t) = Σ_{j,k} O_{s,t}[j, k]^2,
    L = L_task + λ1 Σ_{s<t} L_orth(A_s, A_t) + λ2 Σ_{θ in {A_t, B_t}} ||θ||_2

(A is r x k here, our LoRA layer's layout, so the paper's A_s^T A_t with A as k x r is our A_s A_t^T).
The authors' code sums |O| instead of O^2 for the same purpose; λ2's L2 term is their code's as well
(`bias_loss`, 0 by default here). λ1 is a penalty weight users must tune; the sequence scenario sweeps
it on validation (docs/continual.md) and records the newest adapter's norm after every stage, so that
an adapter the penalty shrinks to nothing is visible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.continual.base import SequentialLoRA, Stage
from lorabench.methods.lora.config import LoraConfig


@dataclass
class OLoRAConfig(LoraConfig):
    ortho_lambda: float = option(0.5, "λ1, the weight of the orthogonality loss Σ_{s<t} ||A_s A_t^T||_F^2 "
                                      "(the authors' scripts use 0.5 on T5-large)", low=0.0)
    l2_lambda: float = option(0.0, "λ2, the weight of the L2 norm of the new adapter's A_t and B_t "
                                   "(the authors' code; 0 = off)", low=0.0)


class OLoRA(SequentialLoRA):
    __doc__ = __doc__
    name = "o-lora"
    title = "Orthogonal Subspace Learning for Language Model Continual Learning (O-LoRA)"
    paper = "2310.14152"
    config_cls = OLoRAConfig
    mechanism_metrics = {
        "orth_overlap_first": "Σ_{s<t} ||A_s A_t^T||_F^2 over the layers at the first step of the last stage (0 without past tasks)",
        "orth_overlap_last": "the same overlap after the last step: the orthogonality loss lowers it",
        "past_adapters": "frozen past adapters whose A the new one is kept orthogonal to",
    }

    def __init__(self, config=None):
        super().__init__(config)
        self.past_A: dict[str, list[torch.Tensor]] = {}  # layer name -> A_s of every finished task s

    def begin_task(self, model: nn.Module, stage: Stage) -> None:
        if stage.t > 0:
            self.reset_adapter(model, stage.seed * 1000 + stage.t)  # a new adapter B_t A_t (B_t = 0)

    def end_task(self, model: nn.Module, stage: Stage) -> dict:
        for name, layer in self.lora_named(model):
            self.past_A.setdefault(name, []).append(layer.lora_A.detach().clone())
        self.fold_adapter(model)  # B_t A_t is now frozen, part of W0 + Σ_{s<=t} s B_s A_s
        with torch.no_grad():
            for _, layer in self.lora_named(model):
                layer.lora_B.zero_()  # the folded update is not counted twice
        return {}

    def overlap(self, model: nn.Module) -> torch.Tensor:
        """Σ_layers Σ_{s<t} Σ_{j,k} (A_s A_t^T)[j, k]^2, differentiable in the current A_t."""
        total = None
        for name, layer in self.lora_named(model):
            for a_s in self.past_A.get(name, []):
                o = a_s.to(layer.lora_A.dtype) @ layer.lora_A.T  # O_{s,t} (r x r)
                term = (o ** 2).sum()                              # L_orth(A_s, A_t)
                total = term if total is None else total + term
        return total

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        c = self.config
        loss = None
        if c.ortho_lambda > 0:
            ov = self.overlap(state.model)
            if ov is not None:
                loss = c.ortho_lambda * ov                            # λ1 Σ_{s<t} L_orth(A_s, A_t)
        if c.l2_lambda > 0:
            l2 = sum(torch.linalg.vector_norm(p) for _, layer in self.lora_named(state.model)
                     for p in (layer.lora_A, layer.lora_B))
            loss = c.l2_lambda * l2 if loss is None else loss + c.l2_lambda * l2  # λ2 Σ ||θ_t||_2
        return loss

    def _measure(self, model: nn.Module) -> float:
        with torch.no_grad():
            ov = self.overlap(model)
        return 0.0 if ov is None else float(ov)

    def on_train_begin(self, state: TrainState) -> None:
        state.metrics["orth_overlap_first"] = round(self._measure(state.model), 8)
        state.metrics["past_adapters"] = len(next(iter(self.past_A.values()), []))

    def on_train_end(self, state: TrainState) -> None:
        state.metrics["orth_overlap_last"] = round(self._measure(state.model), 8)
