"""One eager attention for the methods that act on the attention logits.

HiddenKey (arXiv 2403.00812) drops whole key columns of the logits, LongLoRA's S²-Attn (arXiv
2309.12307) and SinkLoRA's SF-Attn (arXiv 2406.05678) restrict them to a group pattern: each is a
`logits_hook(module, logits) -> logits` on the (B, heads, Tq, Tk) scaled logits, after the model's
own mask and before the softmax. The attention is registered as a transformers attention function
(and the additive float mask that eager attention expects), selected per model instance with
`model.set_attn_implementation(name)`: nothing global is patched.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

LogitsHook = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def eager_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0,
                    logits_hook: LogitsHook | None = None):
    """softmax(q k^T * scaling + mask) v, as transformers' eager attention (query/key/value: (B, heads, T, hd)),
    with `logits_hook` applied to the masked logits. Returns (output (B, T, heads, hd), weights)."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    rep = query.shape[1] // key.shape[1]
    if rep > 1:  # grouped-query attention: each key/value head serves `rep` query heads
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    tq, tk = query.shape[-2], key.shape[-2]
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling                     # (B, H, Tq, Tk)
    low = torch.finfo(logits.dtype).min
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask[..., :tk], low)
        else:
            logits = logits + attention_mask[..., :tk]
    elif getattr(module, "is_causal", False) and tq > 1:
        causal = torch.ones(tq, tk, dtype=torch.bool, device=logits.device).tril(tk - tq)
        logits = logits.masked_fill(~causal, low)
    if logits_hook is not None:
        logits = logits_hook(module, logits)
    weights = F.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def register(name: str, attention: Callable) -> None:
    """Register `attention` (a function of eager_attention's signature) under `name` with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, eager_mask)  # the additive float mask eager attention expects
