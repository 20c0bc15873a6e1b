"""Group-wise uniform (asymmetric, b-bit) fake quantization with learnable parameters, shared by
ApiQ (arXiv 2402.05147: learnable weight clipping) and L4Q (arXiv 2402.04902: LSQ step sizes).

A weight W (out, in) is cut into groups of `group_size` consecutive inputs of each row; every group
has its own scale s and zero point. Rounding passes gradients straight through (the STE of
Bengio et al. 2013, which both papers use), so autograd yields the gradients of the quantization
parameters: the clipping factors of ApiQ and LSQ's step-size gradient for L4Q.
"""
from __future__ import annotations

import torch

GROUP_SIZES = (32, 64, 128)
BITS = (2, 3, 4)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x forward, gradient multiplied by g backward (LSQ's step-size gradient scale, arXiv 1902.08153 sec. 2.2)."""
    return (x - x * g).detach() + x * g


def check_groups(in_features: int, group_size: int, method: str) -> None:
    if group_size not in GROUP_SIZES or in_features % group_size:
        raise ValueError(f"{method}: group_size must be one of {GROUP_SIZES} and divide in_features "
                         f"({in_features}), got {group_size}; choose a group size that divides every adapted layer's "
                         f"input width, or restrict target_modules")


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, in / group_size, group_size)."""
    return w.reshape(w.shape[0], w.shape[1] // group_size, group_size)
