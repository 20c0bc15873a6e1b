"""HiddenKey: LoRA meets dropout under a unified framework (Wang et al., arXiv 2403.00812).

The paper compares dropout methods for LoRA (DropKey, DropAttention, HiddenCut, ...) in one
framework and derives HiddenKey: while training, (1) drop whole key columns of the attention
logits before the softmax (column-wise "DropKey": a dropped key is invisible to every query of a
head), (2) drop elements of the hidden representation entering each feed-forward block, and
(3) add a bidirectional KL consistency loss between two forward passes with independent masks,
which shrinks the gap between the dropout-trained model and the dropout-free one used at
inference (sec. 4): L = L_task + beta * (KL(p1 || p2) + KL(p2 || p1)) / 2. The attention runs as
a registered transformers attention function (`lorabench_hiddenkey`, eager maths) so the logits
are reachable; evaluation is the plain model (no masks), so the adapter merges as LoRA.
A query's own key is never dropped, so no row of the attention is left empty.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.attention import eager_attention, register
from lorabench.methods.base import ApplyContext, TrainState
from lorabench.methods.lora import LoRA, LoraConfig

ATTENTION = "lorabench_hiddenkey"
FFN_INPUT = {"llama": "mlp", "bert": "intermediate"}  # the module whose input is the FFN's hidden input


def drop_key_columns(module: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """While training, drop whole key columns of the logits with probability `module.hiddenkey_p` (DropKey,
    column-wise), never a query's own key."""
    p = getattr(module, "hiddenkey_p", 0.0)
    if module.training and p > 0:
        b, h, tq, tk = logits.shape
        drop = torch.rand(b, h, 1, tk, device=logits.device) < p                # whole key columns
        if tq == tk:
            drop = drop & ~torch.eye(tq, dtype=torch.bool, device=logits.device)  # keep each query's own key
        logits = logits.masked_fill(drop, torch.finfo(logits.dtype).min)
        module.hiddenkey_counts[0] += int(drop.sum()) * tq   # dropped (query, key) pairs, for the record
        module.hiddenkey_counts[1] += b * h * tq * tk
    return logits


def hiddenkey_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention with column-wise dropout of the logits (query/key/value: (B, heads, T, hd))."""
    return eager_attention(module, query, key, value, attention_mask, scaling, dropout, logits_hook=drop_key_columns)


def register_attention() -> None:
    register(ATTENTION, hiddenkey_attention)


def symmetric_kl(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(KL(p_a || p_b) + KL(p_b || p_a)) / 2, averaged over positions (masked positions excluded)."""
    la, lb = a.float().log_softmax(-1), b.float().log_softmax(-1)
    kl = 0.5 * ((la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1))   # per position
    if mask is not None and kl.dim() == mask.dim():
        return (kl * mask).sum() / mask.sum().clamp_min(1)
    return kl.mean()


@dataclass
class HiddenKeyConfig(LoraConfig):
    p_column: float = option(0.1, "probability of dropping a key column of the attention logits", low=0.0, high=0.9)
    p_hidden: float = option(0.1, "element-wise dropout on the input of each feed-forward block", low=0.0, high=0.9)
    kl_weight: float = option(1.0, "beta: weight of the bidirectional KL between two passes (0 = no second pass)",
                              low=0.0)


class HiddenKey(LoRA):
    name = "hiddenkey"
    title = "LoRA Meets Dropout under a Unified Framework (HiddenKey)"
    paper = "2403.00812"
    family = "learning-procedure"
    config_cls = HiddenKeyConfig
    # its bidirectional KL compares the two dropout passes' logits at every unmasked position, not at the targets
    logits_everywhere_in_training = True
    mechanism_metrics = {
        "key_columns_dropped_fraction": "observed fraction of attention key columns dropped in training forwards",
        "hidden_dropped_fraction": "observed fraction of feed-forward input elements dropped",
        "kl_mean": "mean bidirectional KL between the two dropout passes (the consistency loss before beta)",
    }

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        model = super().apply(model, ctx)
        if ctx.architecture not in FFN_INPUT:
            raise ValueError(f"hiddenkey supports {', '.join(FFN_INPUT)} models, not {ctx.architecture!r}")
        register_attention()
        model.set_attn_implementation(ATTENTION)
        c = self.config
        for name, m in model.named_modules():
            if name.endswith(".self_attn") or name.endswith(".attention.self"):
                m.hiddenkey_p, m.hiddenkey_counts = c.p_column, [0, 0]
            if name.endswith("." + FFN_INPUT[ctx.architecture]) and c.p_hidden > 0:
                m.register_forward_pre_hook(self._drop_hidden)
        self.last_logits = None
        self.hidden_counts, self.kl_sum, self.kl_n = [0, 0], 0.0, 0
        model.register_forward_hook(self._capture)
        return model

    def _drop_hidden(self, module, args):
        """Element-wise dropout on the feed-forward block's input, counted for the record."""
        x = args[0]
        out = F.dropout(x, self.config.p_hidden, module.training)
        if module.training:
            self.hidden_counts[0] += int((out == 0).sum()) - int((x == 0).sum())
            self.hidden_counts[1] += x.numel()
        return (out,) + tuple(args[1:])

    def _capture(self, module, args, output):
        if module.training:
            self.last_logits = output.logits

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        if self.config.kl_weight == 0 or self.last_logits is None:
            return None
        first = self.last_logits
        second = state.model(**state.batch).logits   # independent masks: a second sample of the dropout
        mask = state.batch.get("attention_mask")
        kl = symmetric_kl(first, second, mask.float() if mask is not None else None)
        self.kl_sum, self.kl_n = self.kl_sum + float(kl.detach()), self.kl_n + 1
        return self.config.kl_weight * kl

    def on_train_end(self, state: TrainState) -> None:
        attn = [m.hiddenkey_counts for m in state.model.modules() if hasattr(m, "hiddenkey_counts")]
        state.metrics["key_columns_dropped_fraction"] = round(
            sum(a[0] for a in attn) / max(1, sum(a[1] for a in attn)), 4)
        state.metrics["hidden_dropped_fraction"] = round(self.hidden_counts[0] / max(1, self.hidden_counts[1]), 4)
        state.metrics["kl_mean"] = round(self.kl_sum / max(1, self.kl_n), 6)
