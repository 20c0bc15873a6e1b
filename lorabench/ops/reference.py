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


# ---- 4-bit quantized weights: NF4 (QLoRA arXiv 2305.14314) and group-wise int4 (QA-LoRA 2309.14717) ----
# Owned by lorabench/ops/nf4.py and lorabench/ops/int4.py. Packing (both): the weight is flattened
# row-major and element 2i goes to the HIGH nibble of byte i, element 2i+1 to the low nibble
# (bitsandbytes' order). NF4 blocks run over the flattened weight (bitsandbytes' layout, so a block
# may straddle rows); int4 groups run along each row (in % group_size == 0).

NF4_CODE = torch.tensor([  # the 16 NF4 values, sec. 3 of QLoRA (bitsandbytes' fp32 table)
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)


def pack_nibbles(q: torch.Tensor, pad_code: int = 0) -> torch.Tensor:
    """(n,) integer codes in [0, 16) -> (ceil(n/2),) uint8, element 2i in the high nibble; an odd n gets
    `pad_code` in the last low nibble."""
    q = q.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        q = torch.nn.functional.pad(q, (0, 1), value=pad_code)
    return (q[0::2] << 4) | q[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_nibbles: (ceil(n/2),) uint8 -> (n,) int64 codes."""
    p = packed.reshape(-1).to(torch.int64)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n]


def nf4_quantize(weight: torch.Tensor, blocksize: int):
    """Blockwise absmax NF4 (sec. 3 of QLoRA): absmax per block of `blocksize` consecutive elements of the
    flattened weight (the last block may be partial), each x / absmax rounded to the nearest NF4 value
    (ties to the lower one). Bit-exact with bitsandbytes' quantize_4bit: full blocks multiply by the
    reciprocal, the partial block divides. Returns (packed (ceil(n/2),) uint8, absmax (blocks,) fp32)."""
    flat = weight.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n // blocksize,)
    scaled = (blocks * absmax.clamp(min=1e-38).reciprocal()[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp(-1, 1)])
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    q = torch.bucketize(scaled, midpoints.to(scaled.device))  # nearest code, ties to the lower
    return pack_nibbles(q, pad_code=7), absmax  # bitsandbytes pads with 0.0, NF4 code 7


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code book (create_dynamic_map; Dettmers, arXiv 1511.04561), 256 fp32
    values, used by double quantization (sec. 3 of QLoRA) to store the NF4 absmax in 8 bits."""
    data = []
    for i in range(7):  # exponent 10^(i-6), 2^i fraction values, both signs
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def quantize_blockwise8(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256):
    """Blockwise absmax 8-bit quantization with a code book: each x / absmax goes to the nearest code value
    (ties to the lower index), as bitsandbytes' CPU quantize_blockwise (which searches with code[0] = -1).
    Returns (codes uint8, absmax fp32 (blocks,))."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normed = (blocks / absmax[:, None]).reshape(-1)[:n]
    search = code.clone()
    search[0] = -1.0
    left = (torch.searchsorted(search, normed, right=True) - 1).clamp(0, 254)
    right_closer = (normed - search[left + 1]).abs() < (normed - search[left]).abs()
    return (left + right_closer.long()).to(torch.uint8), absmax


def nf4_absmax(absmax, absmax2=None, code2=None, offset=None, blocksize2: int = 256):
    """The fp32 NF4 absmax, decoding double quantization: code2[q] * absmax2[i // 256] + offset."""
    if absmax.dtype != torch.uint8:
        return absmax
    a = code2[absmax.long()] * absmax2.repeat_interleave(blocksize2)[: absmax.numel()]
    return a + offset


def nf4_dequantize(packed, absmax, absmax2, code2, offset, shape, blocksize: int, dtype):
    """W = NF4[q] * absmax(block), computed in fp32 and cast to dtype (bitsandbytes' dequantize_4bit)."""
    n = 1
    for s in shape:
        n *= s
    scale = nf4_absmax(absmax, absmax2, code2, offset).repeat_interleave(blocksize)[:n]
    w = NF4_CODE.to(packed.device)[unpack_nibbles(packed, n)] * scale
    return w.reshape(shape).to(dtype)


def quantized_lora_linear(x, weight, bias, lora_A, lora_B, scale, lora_pool: int = 1):
    """y = x W^T + b + s (P x A^T) B^T with the dequantized W: QLoRA eq. (5) (NF4, P = identity) and QA-LoRA
    (int4, P = average pooling over groups of `lora_pool` inputs, A: (r, in / group), sec. 3.3)."""
    y = torch.nn.functional.linear(x, weight.to(x.dtype), bias)
    if lora_A is not None:
        xp = x if lora_pool == 1 else x.reshape(*x.shape[:-1], x.shape[-1] // lora_pool, lora_pool).mean(-1)  # (tokens, in/g)
        y = y + scale * (xp @ lora_A.T) @ lora_B.T
    return y


def int4_quantize(weight: torch.Tensor, group_size: int):
    """Asymmetric min-max int4 per group of `group_size` inputs of each row (QA-LoRA sec. 3.2, eq. (1)):
    scale = (max - min) / 15, zero = min, q = clamp(round((w - zero) / scale), 0, 15), so that
    W ~ scale * q + zero. A constant group gets scale 1 (q = 0, exact). Returns (packed (out, in/2) uint8,
    scales (out, in/g) fp32, zeros (out, in/g) fp32)."""
    out_f, in_f = weight.shape
    w = weight.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scales = (hi - lo) / 15
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = ((w - lo[..., None]) / scales[..., None]).round().clamp(0, 15)
    return pack_nibbles(q).reshape(out_f, in_f // 2), scales, lo


def int4_dequantize(packed, scales, zeros, group_size: int, dtype):
    """W = scale * q + zero per group (QA-LoRA eq. (1)), fp32 then cast to dtype."""
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    q = unpack_nibbles(packed, out_f * in_f).float().reshape(out_f, -1, group_size)
    return (q * scales[..., None] + zeros[..., None]).reshape(out_f, in_f).to(dtype)


def int4_merge_lora(zeros, lora_A, lora_B, scale: float, group_size: int):
    """QA-LoRA's merge (sec. 3.3): with A acting on the group-averaged input, s B A pool(x) adds
    s (B A)[o, j] / group_size to every weight of group j of row o, i.e. to its zero point:
    zero' = zero + s (B A) / group_size, and W' = scale * q + zero' stays int4 plus fp offsets."""
    return zeros + (scale / group_size) * (lora_B.float() @ lora_A.float())
