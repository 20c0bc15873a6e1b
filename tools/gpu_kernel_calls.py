"""One call of every CUDA kernel of csrc/cuda, at small sizes, through the lorabench ops: what
tools/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck). With --device cpu (the dry run)
the same calls go to the CPU kernels, which proves the script itself runs.

Kernels reached: dora_norm_kernel, dora_epilogue_kernel, dora_grad_kernel (lora.cu; dora_linear forward
and backward, with and without bias, at 5 tokens and at 130, where dora_grad_reduce_kernel adds three
blocks of tokens); dequantize_kernel and gemv_kernel<T, 7> (nf4_int4.cu; batch 7 with x aligned and one
element off, the dequantize path at 16, NF4 and int4); bgmv_shrink_kernel<T, 1> (5 tokens, and 1 token at
in 2048, where shrink_reduce_kernel adds the splits of `in`), bgmv_shrink_kernel<T, 4> (64 tokens),
bgmv_expand_kernel, sgmv_shrink_kernel and sgmv_expand_kernel (bgmv.cu; a 40-token segment over two tiles);
each in fp32 and bf16.
"""
from __future__ import annotations

import argparse
import sys

import torch

from lorabench.ops import dora_linear, multi_lora
from lorabench.ops import int4 as I
from lorabench.ops import nf4 as N


def calls(device: str, dtype: torch.dtype) -> list[str]:
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    done = []
    x, W, b = rnd(5, 96).requires_grad_(), rnd(70, 96), rnd(70)
    A, B, m = rnd(8, 96).requires_grad_(), (0.1 * rnd(70, 8)).requires_grad_(), (rnd(70).abs() + 0.5).requires_grad_()
    for bias in (b, None):
        y = dora_linear(x, W, bias, A, B, m, 2.0)
        y.sum().backward()
    dora_linear(rnd(130, 96), W, b, A, B, m, 2.0).sum().backward()  # three blocks of 64 tokens in the gradient
    done.append("dora_linear fwd+bwd")
    w = torch.randn(64, 256, generator=g)
    nf4 = N.nf4_quantize(w, 64, double_quant=True)
    i4 = I.int4_quantize(w, 64)

    def on(t):
        return None if t is None else t.to(device)

    nf4 = N.NF4Weight(*(on(t) for t in (nf4.packed, nf4.absmax)), nf4.shape, nf4.blocksize,
                      *(on(t) for t in (nf4.absmax2, nf4.code2, nf4.offset)))
    i4 = I.Int4Weight(i4.packed.to(device), i4.scales.to(device), i4.zeros.to(device), i4.group_size)
    N.nf4_dequantize(nf4, dtype)
    I.int4_dequantize(i4, dtype)
    for tokens in (7, 16):  # the GEMV (one launch of 7 rows) and the dequantize + GEMM path
        xs = rnd(tokens, 256)
        N.nf4_linear(xs, nf4)
        I.int4_linear(xs, i4)
    shifted = torch.empty(7 * 256 + 1, device=device, dtype=dtype)[1:].view(7, 256)  # the GEMV's scalar x loads
    shifted.copy_(rnd(7, 256))
    N.nf4_linear(shifted, nf4)
    done.append("nf4/int4 dequantize + linear")
    L, R = 3, 16
    As, Bs = rnd(L, R, 96), rnd(L, 70, R)
    ranks = torch.tensor([16, 4, 1], device=device)
    scales = torch.ones(L, device=device)
    idx = torch.tensor([0, 2, -1, 1, 0], device=device)
    xs = rnd(5, 96)
    y = multi_lora.bgmv_shrink(xs, As, idx, ranks, scales)
    multi_lora.bgmv_expand(rnd(5, 70), y, Bs, idx, ranks)
    starts, seg_idx = torch.tensor([0, 2, 2, 5], device=device), torch.tensor([1, 0, 2], device=device)
    y = multi_lora.sgmv_shrink(xs, As, starts, seg_idx, ranks, scales)
    multi_lora.sgmv_expand(rnd(5, 70), y, Bs, starts, seg_idx, ranks)
    wide = rnd(L, R, 2048)  # 1 token: `in` split across blocks, then the second pass
    y = multi_lora.bgmv_shrink(rnd(1, 2048), wide, idx[:1], ranks, scales)
    multi_lora.bgmv_expand(rnd(1, 70), y, Bs, idx[:1], ranks)
    idx64 = torch.arange(64, device=device) % L  # 64 tokens x rank 16: four rows of A per block
    multi_lora.bgmv_shrink(rnd(64, 96), As, idx64, ranks, scales)
    starts, seg_idx = torch.tensor([0, 40, 45], device=device), torch.tensor([2, 0], device=device)
    x45 = rnd(45, 96)
    y = multi_lora.sgmv_shrink(x45, As, starts, seg_idx, ranks, scales)
    multi_lora.sgmv_expand(rnd(45, 70), y, Bs, starts, seg_idx, ranks)
    done.append("bgmv/sgmv shrink + expand")
    if device == "cuda":
        torch.cuda.synchronize()
    return done


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    a = p.parse_args(argv)
    for dtype in (torch.float32, torch.bfloat16):
        print(dtype, ", ".join(calls(a.device, dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
