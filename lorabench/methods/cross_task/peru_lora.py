"""PERU-LoRA (Jiang, Lin, Shi, Zhang, Li, Kwok, "Effective and Parameter-Efficient Reusing Fine-Tuned Models",
arXiv 2310.01886, sec. 3.2; the same paper as `byom-lora`, its single-task compression): reusing the LoRA
fine-tuned models of T tasks without training, as one merged model plus a small task-specific part per task.

1. The merged model: task arithmetic (Ilharco et al., arXiv 2212.04089) over the tasks' LoRA updates,

       θ* = θ0 + λ Σ_t ΔW_t,        ΔW_t = s B_t A_t

   held exactly as one adapter of rank T·r by concatenating the factors (`uniform_average.concatenated`); the
   paper chooses λ on validation data, here it is the option `merge_lambda` (0.3, task arithmetic's usual value).
2. Each task's own update cut to rank q < r by truncated SVD (the best rank-q approximation, Eckart-Young),

       ΔW_t = U Σ V^T,   ΔW_t ≈ U_q Σ_q V_q^T,      B'_t = U_q Σ_q,  A'_t = V_q^T   (`merging.exact_merge`)

3. Task t is served by θ* + U_q Σ_q V_q^T: the merged model plus its own rank-q part (q (d + k) numbers per layer
   instead of r (d + k)); as one adapter, the merged factors and the rank-q factors concatenated.

The reuse protocol (lorabench/harness/reuse.py, suites/reuse.yaml) drives it: the library's adapter of every pool
task, every task scored with its own reuse, beside the merged model alone (task arithmetic, what PERU adds to) and
each task's own full-rank adapter (a fine-tuned model per task, the reference the paper closes the gap to). A
single-task trial of `peru-lora` trains one library adapter (a LoRA), the kind it reuses; the single-task
compression alone (θ0 instead of θ*) is `byom-lora`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorabench.config import option
from lorabench.methods.cross_task.base import State, check_library, delta_weights
from lorabench.methods.cross_task.merging import exact_merge
from lorabench.methods.cross_task.uniform_average import concatenated
from lorabench.methods.lora import LoRA
from lorabench.methods.lora.config import LoraConfig


@dataclass
class PeruLoraConfig(LoraConfig):
    keep_rank: int = option(4, "rank q kept of each task's own LoRA update by truncated SVD (q < the library's rank)",
                            low=1, high=4096)
    merge_lambda: float = option(0.3, "task arithmetic's scale λ of the merged model θ0 + λ Σ_t ΔW_t (the paper "
                                      "chooses it on validation data)", low=0.0)


def merged_state(states: list[State], lam: float, scale: float) -> State:
    """θ* − θ0 = λ Σ_t s B_t A_t, exactly, as the rank-(T r) adapter of the concatenated factors (s folded into B)."""
    return concatenated(states, [lam] * len(states), scale)


def concat(a: State, b: State) -> State:
    """One adapter computing both updates: A = [A_a; A_b], B = [B_a, B_b] (scale folded in both)."""
    out = {}
    for p in check_library([a]):
        out[f"{p}.lora_A"] = torch.cat([a[f"{p}.lora_A"], b[f"{p}.lora_A"]], dim=0)
        out[f"{p}.lora_B"] = torch.cat([a[f"{p}.lora_B"], b[f"{p}.lora_B"]], dim=1)
    return out


def rank_q_stats(state: State, low: State, scale: float) -> dict:
    """What the cut keeps of one task's update: mean over layers of ||ΔW_q||_F^2 / ||ΔW||_F^2 (energy kept, the
    share of Σ^2 in the q largest singular values) and of ||ΔW − ΔW_q||_F / ||ΔW||_F."""
    full, cut = delta_weights(state, scale), delta_weights(low)
    energy, err = [], []
    for p, dw in full.items():
        n2 = float(dw.double().pow(2).sum())
        energy.append(float(cut[p].double().pow(2).sum()) / n2 if n2 > 0 else 1.0)
        err.append(float((dw.double() - cut[p].double()).norm()) / n2 ** 0.5 if n2 > 0 else 0.0)
    return {"energy_kept": round(sum(energy) / len(energy), 6), "rel_err": round(sum(err) / len(err), 6)}


class PeruLoRA(LoRA):
    __doc__ = __doc__
    name = "peru-lora"
    title = "Effective and parameter-efficient reusing fine-tuned models: PERU-LoRA, a merged model plus each task's rank-q LoRA update"
    paper = "2310.01886"
    family = "cross-task"
    config_cls = PeruLoraConfig

    def reuse(self, states: list[State], scale: float) -> dict:
        """The merged model's update (scale folded) and, per task t, θ* + its rank-q update, and the rank-q stats."""
        c = self.config
        rank = states[0][f"{check_library(states)[0]}.lora_A"].shape[0]
        if c.keep_rank >= rank:
            raise ValueError(f"keep_rank={c.keep_rank} keeps the whole rank-{rank} update: PERU-LoRA cuts it to a "
                             f"lower rank q < {rank}")
        merged = merged_state(states, c.merge_lambda, scale)
        per_task, stats = [], []
        for s in states:
            low = exact_merge([s], [1.0], scale, c.keep_rank)   # U_q Σ_q V_q^T of s B_t A_t, scale 1
            per_task.append(concat(merged, low))
            stats.append(rank_q_stats(s, low, scale))
        return {"merged": merged, "per_task": per_task, "stats": stats}
