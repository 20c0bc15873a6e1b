"""Shifted sparse attention for long-context fine-tuning, shared by `longlora` and `sinklora`.

S²-Attn (LongLoRA, arXiv 2309.12307, sec. 3.2 and its Algorithm 1): while training, the tokens
are split into groups of G = group_size_ratio x (training length) tokens and each token attends
only inside its group; in half of the heads the groups are shifted by G/2 tokens, so that
information flows between neighbouring groups. The paper implements it by rolling those heads'
tokens by -G/2, reshaping into groups and rolling the output back; the last shifted group then
wraps around, holding the sequence's last G/2 and first G/2 tokens.

SF-Attn (SinkLoRA, arXiv 2406.05678, sec. 3): (1) "segmentation and reassembly": the cyclically
shifted groups are returned to their un-shifted order, so the wrapped group is cut into its two
segments (the last G/2 tokens and the first G/2 tokens no longer see each other); (2) global
attention of the first `n_sink` "sink attention tokens": every token attends to them and they
attend to every token (within the model's causal mask).

Both are written here as a boolean (heads, T, T) pattern applied to dense eager attention: the
patterns equal the paper's roll-reshape-roll computation (tests/methods/cases_longctx.py checks
this against an explicit per-group reference), work for any T (the last group may be shorter
than G) and any padding. The model's own mask (causal and padding) is applied in the original
token order, so in a decoder the wrapped group of S²-Attn does not let the first tokens see the
last ones (with the causal mask applied in rolled order, as the paper's code does, they would).
At evaluation the attention is the full attention (the paper's claim: S²-Attn is needed only
for training). The pattern's share of the attention pairs is what a grouped kernel would
compute; this eager implementation computes the dense scores and masks them.

The attention is a registered transformers attention function (`lorabench_longctx`), selected
per model instance with `model.set_attn_implementation`, and reads its settings from an
attribute of each attention module: nothing global is patched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorabench.methods.attention import eager_attention, register

ATTENTION = "lorabench_longctx"
SPEC_ATTR = "lorabench_longctx"   # the attribute of each attention module holding its LongCtxSpec


def group_ids(T: int, group: int, shift: int = 0, wrap: bool = True, device=None) -> torch.Tensor:
    """Group index of each position 0..T-1.

    shift=0: groups [0, G), [G, 2G), ... ; shift=s with wrap (S²-Attn): the groups of the sequence
    rolled by -s, i.e. position i is in group ((i - s) mod T) // G, so the last group holds the
    last s and the first ones; wrap=False (SF-Attn's reassembly): group floor((i - s) / G), the
    first s positions form their own segment."""
    i = torch.arange(T, device=device)
    if shift == 0:
        return i // group
    j = i - shift
    return torch.remainder(j, T) // group if wrap else torch.div(j, group, rounding_mode="floor")


def attention_pattern(T: int, n_heads: int, group: int, n_sink: int = 0, wrap: bool = True,
                      device=None) -> torch.Tensor | None:
    """(n_heads, T, T) bool: True where query i may attend to key j; None = full attention
    (group >= T: the grouped attention degenerates to full attention)."""
    if group >= T:
        return None
    shift = group // 2
    plain = group_ids(T, group, 0, device=device)
    shifted = group_ids(T, group, shift, wrap, device=device)
    same_plain = plain[:, None] == plain[None, :]          # Algorithm 1 of LongLoRA: heads [0, H/2)
    same_shift = shifted[:, None] == shifted[None, :]      # heads [H/2, H): rolled by -G/2
    half = n_heads // 2
    pattern = torch.stack([same_plain] * half + [same_shift] * (n_heads - half))
    if n_sink > 0:  # SF-Attn's global attention of the sink tokens (SinkLoRA sec. 3)
        i = torch.arange(T, device=device)
        pattern = pattern | (i[None, :] < n_sink) | (i[:, None] < n_sink)
    return pattern


@dataclass
class LongCtxSpec:
    """The training-time attention of one model: group size from the training length, sinks, wrap."""
    group_size_ratio: float
    train_length: int | None = None  # None: the padded length of each batch
    n_sink: int = 0
    wrap: bool = True

    def group_size(self, T: int) -> int:
        length = self.train_length or T
        return max(1, int(math.floor(self.group_size_ratio * length)))   # G = ratio x training length

    def pattern(self, T: int, n_heads: int, device=None) -> torch.Tensor | None:
        return attention_pattern(T, n_heads, self.group_size(T), self.n_sink, self.wrap, device)


def pattern_hook(module: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """While training, mask the logits outside the module's S²-Attn / SF-Attn pattern (attend within the group)."""
    spec: LongCtxSpec | None = getattr(module, SPEC_ATTR, None)
    tq, tk = logits.shape[-2:]
    if spec is not None and module.training and tq == tk:
        pattern = spec.pattern(tq, logits.shape[1], logits.device)
        if pattern is not None:
            logits = logits.masked_fill(~pattern, torch.finfo(logits.dtype).min)
    return logits


def longctx_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs):
    """Eager attention (query/key/value: (B, heads, T, hd)) with the grouped pattern while training."""
    return eager_attention(module, query, key, value, attention_mask, scaling, dropout, logits_hook=pattern_hook)


def register_attention() -> None:
    register(ATTENTION, longctx_attention)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that call the attention function (Llama's self_attn, BERT's attention.self)."""
    out = [m for n, m in model.named_modules() if n.endswith(".self_attn") or n.endswith(".attention.self")]
    if not out:
        raise ValueError(f"no attention modules (…self_attn, …attention.self) in this "
                         f"{type(model).__name__}; longlora/sinklora support Llama and BERT models")
    return out


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]


@torch.no_grad()
def interpolate_positions(model: nn.Module, factor: float) -> int:
    """Position Interpolation (arXiv 2306.15595, eq. (2)), LongLoRA's way of extending RoPE: position
    m is rotated as m / factor, i.e. every RoPE frequency theta_i is divided by `factor`.
    Returns the number of rotary modules changed (0 when the model has no RoPE)."""
    mods = rotary_modules(model)
    for m in mods:
        m.inv_freq = m.inv_freq / factor                   # theta_i -> theta_i / s: f(x, m) = f(x, m / s)
        if isinstance(getattr(m, "original_inv_freq", None), torch.Tensor):
            m.original_inv_freq = m.original_inv_freq / factor
    return len(mods)


def pattern_fraction(pattern: torch.Tensor | None, attention_mask: torch.Tensor | None, causal: bool,
                     T: int) -> float:
    """Share of the (query, key) pairs of full attention that the pattern keeps, over the batch's
    real tokens (1.0 for full attention)."""
    if pattern is None:
        return 1.0
    valid = attention_mask.bool() if attention_mask is not None else torch.ones(1, T, dtype=torch.bool)
    base = valid[:, :, None] & valid[:, None, :]                                   # (B, T, T)
    if causal:
        base = base & torch.ones(T, T, dtype=torch.bool).tril()
    kept = (base[:, None] & pattern[None].to(base.device)).sum().item()
    return kept / max(1, base.sum().item() * pattern.shape[0])
