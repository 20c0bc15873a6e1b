"""Pure-PyTorch reference implementations of every lorabench op.

Each function reads like the equation of its paper; every backend is tested against these.
They are also the fallback when the compiled extension is not built.
"""
from __future__ import annotations

import torch


# --- LoRA linear (arXiv 2106.09685) and DoRA (arXiv 2402.09353) ------------------------------
# Owned by the lora_linear kernels (lorabench/ops/lora.py). x is (tokens, in), weight (out, in),
# lora_A (r, in), lora_B (out, r). Dropout acts on the LoRA branch only, as in PEFT; the mask is an
# explicit input (0 or 1/(1-p), the shape of x) so every backend sees the same one.


def lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_mask=None):
    """eq. (3) of LoRA: h = W0 x + b + s * B A dropout(x)."""
    x_drop = x if dropout_mask is None else x * dropout_mask
    return torch.nn.functional.linear(x, weight, bias) + scale * (x_drop @ lora_A.T) @ lora_B.T


def dora_weight_norm(weight, lora_A, lora_B, scale):
    """||W + s B A|| over each output row (dim=1, PEFT's convention), detached as in sec. 4.3 of DoRA."""
    return torch.linalg.norm(weight + scale * (lora_B @ lora_A), dim=1).detach()


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_mask=None):
    """eq. (5) of DoRA: W' = m * (W + s B A) / ||W + s B A||_c, y = W' x + b.

    With dropout on the LoRA branch (PEFT's DoraLinearLayer): the base path sees x, the DoRA
    correction sees dropout(x): y = W x + b + (m/n - 1) W x_d + (m/n) s B A x_d.
    """
    mag_norm_scale = magnitude / dora_weight_norm(weight, lora_A, lora_B, scale)  # (out,)
    x_drop = x if dropout_mask is None else x * dropout_mask
    lora = scale * (x_drop @ lora_A.T) @ lora_B.T  # (tokens, out)
    base = torch.nn.functional.linear(x, weight, bias)
    base_drop = base if dropout_mask is None else torch.nn.functional.linear(x_drop, weight, bias)
    if bias is not None:
        base_drop = base_drop - bias
    return base + (mag_norm_scale - 1) * base_drop + mag_norm_scale * lora


# ---- Multi-adapter LoRA: BGMV / SGMV (Punica arXiv 2310.18547, S-LoRA arXiv 2311.03285) ----
# Slots: A (L, R, in), B (L, out, R), ranks (L,), scales (L,); slot l uses A[l, :r], B[l, :, :r] with
# r = ranks[l] and nothing past r. idx[i] = -1: token i has no adapter. Layout: lorabench/ops/multi_lora.py.

def _check_multi_lora_values(idx: torch.Tensor, ranks: torch.Tensor, max_rank: int) -> None:
    L = ranks.shape[0]
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= L):
        raise ValueError(f"adapter index out of range: got [{int(idx.min())}, {int(idx.max())}], valid "
                         f"are -1 (no adapter) and 0..{L - 1} (the {L} slots)")
    if ranks.numel() and (int(ranks.min()) < 0 or int(ranks.max()) > max_rank):
        raise ValueError(f"slot ranks must lie in 0..{max_rank} (the slots' max_rank), got "
                         f"[{int(ranks.min())}, {int(ranks.max())}]")


def _segments_to_tokens(seg_starts: torch.Tensor, seg_idx: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """SGMV's segments as BGMV's per-token index: seg_idx repeated over each segment's length."""
    lengths = seg_starts.diff()
    if int(seg_starts[0]) != 0 or int(seg_starts[-1]) != n_tokens or bool((lengths < 0).any()):
        raise ValueError(f"seg_starts must rise from 0 to the number of tokens ({n_tokens}), got "
                         f"{seg_starts.tolist()[:8]}{'...' if seg_starts.numel() > 8 else ''}")
    return seg_idx.repeat_interleave(lengths)


def bgmv_shrink(x: torch.Tensor, A: torch.Tensor, idx: torch.Tensor, ranks: torch.Tensor,
                scales: torch.Tensor) -> torch.Tensor:
    """y[i] = s_l * x[i] A_l^T, l = idx[i]: the shrink half of eq. (3) of LoRA (arXiv 2106.09685)."""
    _check_multi_lora_values(idx, ranks, A.shape[1])
    y = torch.zeros(x.shape[0], A.shape[1], dtype=torch.float32, device=x.device)  # (T, R)
    for l in idx.unique().tolist():
        if l < 0:
            continue  # no adapter: y[i] = 0
        tokens, r = (idx == l).nonzero().squeeze(1), int(ranks[l])
        y[tokens, :r] = scales[l] * (x[tokens].float() @ A[l, :r].float().T)  # (t, r)
    return y


def bgmv_expand(out: torch.Tensor, y: torch.Tensor, B: torch.Tensor, idx: torch.Tensor,
                ranks: torch.Tensor) -> torch.Tensor:
    """out[i] += y[i] B_l^T, l = idx[i]: the expand half of eq. (3) of LoRA; in place, returns out."""
    _check_multi_lora_values(idx, ranks, B.shape[2])
    for l in idx.unique().tolist():
        if l < 0:
            continue
        tokens, r = (idx == l).nonzero().squeeze(1), int(ranks[l])
        out[tokens] = (out[tokens].float() + y[tokens, :r] @ B[l, :, :r].float().T).to(out.dtype)
    return out


def sgmv_shrink(x, A, seg_starts, seg_idx, ranks, scales) -> torch.Tensor:
    """SGMV shrink = BGMV shrink after repeat_interleave of the segments' slots."""
    return bgmv_shrink(x, A, _segments_to_tokens(seg_starts, seg_idx, x.shape[0]), ranks, scales)


def sgmv_expand(out, y, B, seg_starts, seg_idx, ranks) -> torch.Tensor:
    """SGMV expand = BGMV expand after repeat_interleave of the segments' slots."""
    return bgmv_expand(out, y, B, _segments_to_tokens(seg_starts, seg_idx, out.shape[0]), ranks)
