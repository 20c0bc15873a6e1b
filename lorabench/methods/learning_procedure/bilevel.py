"""Bi-level training on split data, shared by BiLoRA (arXiv 2403.13037) and AutoLoRA (2403.09113).

Both papers learn some adapter tensors (BiLoRA's singular values, AutoLoRA's rank-selection
weights) on a validation split and the rest on the training split, alternating first-order
updates of the two levels. In one training stream we split the data by step: every
`upper_every`-th batch is an upper-level (validation) batch, on which only the upper-level
tensors get gradients; on all other batches only the lower-level tensors (and the task head)
do. Each batch is therefore learned from by exactly one level, as with two disjoint splits.
"""
from __future__ import annotations

from torch import nn


def is_upper_step(step: int, upper_every: int) -> bool:
    return step % upper_every == upper_every - 1


def keep_gradients(trainable: list[nn.Parameter], keep: set[int]) -> None:
    """Drop the gradients of every trainable parameter whose id is not in `keep` (AdamW then skips it)."""
    for p in trainable:
        if id(p) not in keep:
            p.grad = None
