"""`python -m lorabench bench kernels --op nf4_linear` (and `--op int4_linear`): the 4-bit linear kernels.

Per (tokens, in, out), interleaved in one run (lorabench.bench.kernels._interleaved: one sample of each
variant per round, the order rotating, medians over rounds):

    ours        lorabench nf4_linear (NF4, blocksize 64, double quantization, as QLoRA) or int4_linear
                (group size 64), fp32 activations
    bnb         bitsandbytes.matmul_4bit on the same NF4 weight (nf4_linear only)
    reference   the pure-PyTorch reference: dequantize the whole weight, then F.linear
    dense_fp32  F.linear with the fp32 weight
    dense_bf16  F.linear with bf16 weight and activations

The physical limit: the machine's read bandwidth, measured in the same run as the median time of
`x.sum()` over a 1 GiB fp32 tensor with the run's torch threads (with --threads 1: the single-thread
read bandwidth, the limit of a one-thread GEMV; --clock cpu times it on the thread's CPU clock too);
`gbps` is (packed weight + its scales) bytes / ours' time, the traffic a batch-1 GEMV must read at
least once. Without --tokens / --shapes the grid is the issue's:
tokens {1, 8, 64, 512} x (in, out) {(4096, 4096), (4096, 11008), (576, 1536)}. Options (--option KEY=VALUE): bw_gib (size of the
bandwidth probe, default 1), group_size (int4, default 64), blocksize (NF4, default 64),
double_quant (NF4, default 1).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.benchmark as tb

from lorabench.bench import kernels as K

TOKENS = (1, 8, 64, 512)
SHAPES = ((4096, 4096), (4096, 11008), (576, 1536))  # Llama-7B attention and MLP, SmolLM2-135M MLP


@dataclass
class QuantResult:
    op: str
    tokens: int
    n_in: int
    n_out: int
    ours_us: float
    bnb_us: float                 # nan for int4_linear
    reference_us: float
    dense_fp32_us: float
    dense_bf16_us: float
    speedup_vs_bnb: float         # t_bnb / t_ours (target >= 10 at batch 1)
    speedup_vs_fp32: float        # t_fp32 / t_ours (target >= 2 at batch 1)
    ours_over_bf16: float         # t_ours / t_bf16 (target <= 1.3 at batch >= 64)
    speedup_vs_reference: float
    weight_mib: float             # packed weight + scales
    gbps: float                   # weight bytes / t_ours
    pct_of_read_bw: float         # 100 gbps / read_bw_gbps (target >= 50 at batch 1)
    read_bw_gbps: float           # measured in this run (x.sum() over bw_gib GiB)


def read_bandwidth_gbps(gib: float = 1.0, rounds: int = 7, clock: str = "wall") -> float:
    """Memory read bandwidth: bytes / median time of a sum over a `gib` GiB fp32 tensor (torch's threads;
    clock "cpu": CPU time of the calling thread, as the kernels are then timed)."""
    x = torch.ones(int(gib * 2**30) // 4)
    kw = {"timer": time.thread_time} if clock == "cpu" else {}
    t = tb.Timer("x.sum()", globals={"x": x}, num_threads=torch.get_num_threads(), **kw)
    t.timeit(1)
    return x.numel() * 4 / statistics.median(t.timeit(1).mean for _ in range(rounds)) / 1e9


def _opt(cfg: K.Config, key: str, default: float) -> float:
    return float(dict(cfg.options).get(key, default))


def _variants(cfg: K.Config, op: str, tokens: int, n_in: int, n_out: int):
    """name -> f(), and the bytes of the quantized weight."""
    from lorabench.ops import int4, nf4
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
    x = torch.randn(tokens, n_in, generator=g).to(getattr(torch, cfg.dtype)).to(cfg.device)
    w_dev, w_bf16, x_f32, x_bf16 = w.to(cfg.device), w.bfloat16().to(cfg.device), x.float(), x.bfloat16()
    out = {"dense_fp32": lambda: F.linear(x_f32, w_dev), "dense_bf16": lambda: F.linear(x_bf16, w_bf16)}
    if op == "nf4_linear":
        bs, dq = int(_opt(cfg, "blocksize", 64)), bool(int(_opt(cfg, "double_quant", 1)))
        s = nf4.nf4_quantize(w, bs, dq)
        s = nf4.NF4Weight(*(t.to(cfg.device) if t is not None else None for t in (s.packed, s.absmax)), s.shape,
                          bs, *(t.to(cfg.device) if t is not None else None for t in (s.absmax2, s.code2, s.offset)))
        out["ours"] = lambda: nf4.nf4_linear(x, s)
        out["reference"] = lambda: nf4._nf4_linear_ref(x, *s.tensors(), n_out, bs, None, None, None, 1.0)
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bF
            q, st = bF.quantize_4bit(w.to(cfg.device), blocksize=bs, quant_type="nf4", compress_statistics=dq)
            out["bnb"] = lambda: bnb.matmul_4bit(x, q.t(), quant_state=st)
        except ImportError:
            pass
        nbytes = sum(t.numel() * t.element_size() for t in s.tensors() if t is not None)
    else:
        gs = int(_opt(cfg, "group_size", 64))
        s = int4.int4_quantize(w, gs)
        s = int4.Int4Weight(s.packed.to(cfg.device), s.scales.to(cfg.device), s.zeros.to(cfg.device), gs)
        out["ours"] = lambda: int4.int4_linear(x, s)
        out["reference"] = lambda: int4._int4_linear_ref(x, *s.tensors(), gs, None, None, None, 1.0)
        nbytes = sum(t.numel() * t.element_size() for t in s.tensors())
    return out, nbytes


def _timer(fn, device, clock):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():  # CUDA: time to completion
        with torch.no_grad():
            fn()
        sync()
    kw = {"timer": time.thread_time} if clock == "cpu" else {}
    return tb.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads(), **kw)


def bench(cfg: K.Config, log=print) -> list[QuantResult]:
    bw = read_bandwidth_gbps(_opt(cfg, "bw_gib", 1.0), clock=cfg.clock) if cfg.device == "cpu" else float("nan")
    log(f"measured read bandwidth: {bw:.1f} GB/s (median time of x.sum() over {_opt(cfg, 'bw_gib', 1.0):g} GiB, "
        f"{torch.get_num_threads()} thread(s), {cfg.clock} clock)")
    rows = []
    nan = float("nan")
    default_grid = cfg.tokens == K.TOKENS and cfg.shapes == K.SHAPES  # no --tokens / --shapes given
    for n_in, n_out in SHAPES if default_grid else cfg.shapes:
        for tokens in TOKENS if default_grid else cfg.tokens:
            fns, nbytes = _variants(cfg, cfg.op, tokens, n_in, n_out)
            med = {k: statistics.median(v) for k, v in
                   K._interleaved({k: _timer(f, cfg.device, cfg.clock) for k, f in fns.items()}, cfg).items()}
            t = med["ours"]
            gbps = nbytes / t / 1e9
            rows.append(QuantResult(
                op=cfg.op, tokens=tokens, n_in=n_in, n_out=n_out, ours_us=t * 1e6, bnb_us=med.get("bnb", nan) * 1e6,
                reference_us=med["reference"] * 1e6, dense_fp32_us=med["dense_fp32"] * 1e6,
                dense_bf16_us=med["dense_bf16"] * 1e6, speedup_vs_bnb=med.get("bnb", nan) / t,
                speedup_vs_fp32=med["dense_fp32"] / t, ours_over_bf16=t / med["dense_bf16"],
                speedup_vs_reference=med["reference"] / t, weight_mib=nbytes / 2**20, gbps=gbps,
                pct_of_read_bw=100 * gbps / bw, read_bw_gbps=bw))
            log(K.format_row(rows[-1]))
    return rows


def summarize(rows: list[QuantResult]) -> dict:
    """The issue's CPU targets, checked on this run's numbers."""
    b1 = [r for r in rows if r.tokens == 1]
    big = [r for r in rows if r.tokens >= 64]
    mn = lambda v: min(v) if v else None  # noqa: E731
    mx = lambda v: max(v) if v else None  # noqa: E731
    return {
        "read_bw_gbps": rows[0].read_bw_gbps if rows else None,
        "batch1_min_speedup_vs_bnb (target >= 10)": mn([r.speedup_vs_bnb for r in b1 if r.speedup_vs_bnb == r.speedup_vs_bnb]),
        "batch1_min_speedup_vs_fp32 (target >= 2)": mn([r.speedup_vs_fp32 for r in b1]),
        "batch1_min_pct_of_read_bw (target >= 50)": mn([r.pct_of_read_bw for r in b1]),
        "batch>=64_max_ours_over_bf16 (target <= 1.3)": mx([r.ours_over_bf16 for r in big]),
    }


K.OP_BENCHES.update({"nf4_linear": bench, "int4_linear": bench})
K.SUMMARIES.update({"nf4_linear": summarize, "int4_linear": summarize})
