"""Merging N LoRA adapters into one, exactly and as PEFT does it (issue 17), with each merge's error.

The exact weighted merge of adapters (A_i, B_i) at scale s is, per adapted layer,

    ΔW = Σ_i w_i s B_i A_i                                          (out, in)

held exactly as one adapter of rank Σ r_i by concatenation (`uniform_average.concatenated`, PEFT's `cat`),
or brought to a target rank by a truncated SVD, ΔW ≈ U_k S_k V_k^T: B' = U_k S_k, A' = V_k^T at scale 1
(`exact_merge`; PEFT's `svd` type computes the same, tested). PEFT's other types (peft.LoraModel.
add_weighted_adapter) act on the factors: `linear` sums sqrt(w_i s) A_i and sqrt(w_i s) B_i separately,
so its product carries cross terms B_i A_j (peft's issue 3004); `ties`, `dare_*` and `magnitude_prune`
sparsify the factors (or, with `_svd`, the dense ΔW_i) before summing. `merge_error` measures each
against the exact ΔW: ‖ΔW_merge - ΔW‖_F / ‖ΔW‖_F over all layers together.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lorabench.methods.cross_task.base import State, check_library, delta_weights

PEFT_TYPES = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties",
              "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
DENSITY_TYPES = {t for t in PEFT_TYPES if t.startswith(("ties", "dare", "magnitude"))}


def exact_delta(states: list[State], weights: list[float], scale: float) -> dict[str, torch.Tensor]:
    """ΔW = Σ_i w_i s B_i A_i per layer, in float64 (the reference every merge is measured against)."""
    out = {}
    for p in check_library(states):
        out[p] = sum(w * scale * s[f"{p}.lora_B"].double() @ s[f"{p}.lora_A"].double() for w, s in zip(weights, states))
    return out


def exact_merge(states: list[State], weights: list[float], scale: float, rank: int) -> State:
    """The exact weighted sum ΔW, then its best rank-`rank` approximation (Eckart-Young): B' = U_k S_k, A' = V_k^T,
    scale 1. Exact (up to rounding) when `rank` >= rank(ΔW), e.g. >= Σ r_i."""
    if rank < 1:
        raise ValueError(f"target rank must be >= 1, got {rank}")
    out = {}
    for p, dw in exact_delta(states, weights, scale).items():
        U, S, Vh = torch.linalg.svd(dw.float(), full_matrices=False)   # float32, as PEFT's svd merge
        k = min(rank, S.shape[0])
        out[f"{p}.lora_B"] = U[:, :k] * S[:k]                          # (out, k)
        out[f"{p}.lora_A"] = Vh[:k]                                    # (k, in)
    return out


def merge_error(state: State, exact: dict[str, torch.Tensor], scale: float = 1.0) -> float:
    """‖ΔW(state) - ΔW_exact‖_F / ‖ΔW_exact‖_F over all layers (0 for an exact merge, up to rounding)."""
    got = delta_weights(state, scale)
    num = sum(float((got[p].double() - exact[p]).pow(2).sum()) for p in exact)
    den = sum(float(exact[p].pow(2).sum()) for p in exact)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _skeleton(states: list[State]) -> nn.Module:
    """A module tree holding an nn.Linear of the right shape at each adapted layer's path: all PEFT needs."""
    root = nn.Module()
    for p in check_library(states):
        A, B = states[0][f"{p}.lora_A"], states[0][f"{p}.lora_B"]
        parent, parts = root, p.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(parts[-1], nn.Linear(A.shape[1], B.shape[0], bias=False))
    return root


def peft_merge(states: list[State], weights: list[float], scale: float, combination_type: str,
               density: float = 0.5, svd_rank: int | None = None, seed: int = 0) -> State:
    """The adapters merged by peft's LoraModel.add_weighted_adapter(combination_type), as a state at scale 1."""
    import peft
    from peft.tuners.lora import LoraModel
    if combination_type not in PEFT_TYPES:
        raise ValueError(f"unknown PEFT combination type {combination_type!r}; valid: {', '.join(PEFT_TYPES)}")
    layers = check_library(states)
    rank = states[0][f"{layers[0]}.lora_A"].shape[0]
    cfg = peft.LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=layers, lora_dropout=0.0)
    names = [f"a{i}" for i in range(len(states))]
    model = LoraModel(_skeleton(states), cfg, names[0])
    for n in names[1:]:
        model.peft_config[n] = cfg
        model.inject_adapter(model.model, n)
    with torch.no_grad():
        for n, s in zip(names, states):
            for p in layers:
                m = model.model.get_submodule(p)
                m.lora_A[n].weight.copy_(s[f"{p}.lora_A"])
                m.lora_B[n].weight.copy_(s[f"{p}.lora_B"])
    torch.manual_seed(seed)   # DARE's random drops
    kwargs = {"density": density} if combination_type in DENSITY_TYPES else {}
    if combination_type.endswith("svd"):
        kwargs["svd_rank"] = svd_rank
    model.add_weighted_adapter(names, list(weights), "merged", combination_type=combination_type, **kwargs)
    out = {}
    for p in layers:
        m = model.model.get_submodule(p)
        out[f"{p}.lora_A"] = m.lora_A["merged"].weight.detach().clone()
        out[f"{p}.lora_B"] = m.scaling["merged"] * m.lora_B["merged"].weight.detach().clone()   # scale folded
    return out
