"""BYOM-LoRA, from "Effective and Parameter-Efficient Reusing Fine-Tuned Models" (Jiang, Lin, Shi,
Zhang, Li, Kwok; arXiv 2310.01886; the method is called PERU-LoRA in later versions).

The paper reuses task-specific fine-tuned models without training: for models fine-tuned with LoRA
it keeps, per task, only a *lower-rank* approximation of the task's LoRA update, obtained by
truncated singular value decomposition (sec. 3.2):

    ΔW_t = s B_t A_t = U Σ V^T,    ΔW_t ≈ U_q Σ_q V_q^T,   q < r              (rank-q SVD of the LoRA matrix)

so the task-specific part stored and served is q (d + k) numbers instead of r (d + k); by the
Eckart-Young theorem it is the best rank-q approximation in Frobenius norm. The approximation is
injected into the model the tasks share: in the paper's multi-task setting a merged model θ*
(task arithmetic over the tasks), here, in a single-task trial, the pre-trained model (there are no
other tasks to merge; the cross-task scenario is where θ* is non-trivial).

In this harness the method first produces the LoRA fine-tuned model it reuses (LoRA at rank r for
the trial's budget), then compresses it training-free at the end of training; the evaluation and the
saved adapter use the rank-q factors B' = U_q sqrt(Σ_q / s), A' = sqrt(Σ_q / s) V_q^T (so s B' A' is
the rank-q approximation). The board therefore shows what the compression costs against LoRA at
rank r.

Mechanism metrics (method_metrics): `trained_rank` r, `kept_rank` q, `energy_kept` (mean over layers of
sum Σ_q^2 / sum Σ^2), `delta_rel_err` (mean ||ΔW - ΔW_q||_F / ||ΔW||_F) and the training loss of the
last batch with the rank-r and with the rank-q adapter (`loss_rank_r`, `loss_rank_q`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.lora import LoRA, LoraConfig, LoraLinear


@dataclass
class ByomLoraConfig(LoraConfig):
    keep_rank: int = option(4, "rank q kept by the truncated SVD of each layer's LoRA update after training "
                               "(must be below rank r)", low=1, high=4096)

    def __post_init__(self):
        super().__post_init__()
        if self.keep_rank >= self.rank:
            raise ValueError(f"byom-lora: keep_rank ({self.keep_rank}) must be below rank ({self.rank}); the method "
                             f"compresses the rank-r LoRA update to rank q < r")


def truncated_factors(delta: torch.Tensor, q: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B', A', S) with scale B' A' = U_q Σ_q V_q^T, the rank-q truncated SVD of delta (d, k); S all singular values."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    root = torch.sqrt(S[:q] / scale)
    return U[:, :q] * root[None], root[:, None] * Vh[:q], S


class ByomLoRA(LoRA):
    name = "byom-lora"
    title = "BYOM-LoRA: Effective and Parameter-Efficient Reusing Fine-Tuned Models"
    paper = "2310.01886"
    family = "efficiency-freezing-sharing"
    config_cls = ByomLoraConfig
    default_lr = 5e-4  # LoRA's: the fine-tuning stage is LoRA
    mechanism_metrics = {
        "trained_rank": "rank r of the LoRA update that was trained (and then compressed)",
        "kept_rank": "rank q kept by the truncated SVD of each layer's update (q < r)",
        "energy_kept": "mean over layers of sum Σ_q^2 / sum Σ^2: the share of the update's energy kept",
        "delta_rel_err": "mean ||ΔW - ΔW_q||_F / ||ΔW||_F: the compression error (Eckart-Young)",
        "loss_rank_r": "training loss of the last batch with the rank-r adapter",
        "loss_rank_q": "the same with the compressed rank-q adapter",
    }

    @torch.no_grad()
    def compress(self, model: nn.Module) -> dict:
        """Replace every layer's rank-r factors by the rank-q truncated SVD of its update (training-free)."""
        q = self.config.keep_rank
        energy, err = [], []
        for layer in self.lora_layers(model):
            if layer.rank <= q:
                continue
            delta = layer.delta_weight()
            B, A, S = truncated_factors(delta, q, layer.scale)
            total = S.pow(2).sum().clamp(min=1e-30)
            energy.append((S[:q].pow(2).sum() / total).item())
            err.append((S[q:].pow(2).sum() / total).sqrt().item())  # Eckart-Young: ||ΔW - ΔW_q||_F / ||ΔW||_F
            dt, trainable = layer.lora_A.dtype, layer.lora_A.requires_grad
            layer.lora_A = nn.Parameter(A.to(dt), requires_grad=trainable)   # (q, k)
            layer.lora_B = nn.Parameter(B.to(dt), requires_grad=trainable)   # (d, q)
            layer.rank = q
        if not energy:
            return {}
        return {"trained_rank": self.config.rank, "kept_rank": q, "energy_kept": sum(energy) / len(energy), "delta_rel_err": sum(err) / len(err)}

    @torch.no_grad()
    def on_train_end(self, state: TrainState) -> None:
        model = state.model
        was_training = model.training
        model.eval()
        loss_r = model(**state.batch).loss.item() if state.batch is not None else None
        state.metrics.update(self.compress(model))
        if loss_r is not None:
            state.metrics.update({"loss_rank_r": loss_r, "loss_rank_q": model(**state.batch).loss.item()})
        model.train(was_training)

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """A compressed adapter has rank-q factors: give the layers that shape before loading them."""
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLinear) and f"{name}.lora_A" in state:
                A = state[f"{name}.lora_A"]
                if A.shape[0] != layer.rank:
                    dt, dev = layer.lora_A.dtype, layer.lora_A.device
                    layer.lora_A = nn.Parameter(torch.zeros(A.shape, dtype=dt, device=dev))
                    layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, A.shape[0], dtype=dt, device=dev))
                    layer.rank = A.shape[0]
        super().load_adapter_state_dict(model, state)
