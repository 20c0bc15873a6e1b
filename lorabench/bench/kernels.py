"""`python -m lorabench bench kernels --op OP`: kernel benchmarks, measured interleaved in one run.

lora_linear / dora_linear: the LoRA overhead, t(LoRA linear) / t(base linear) - 1, of
  eager  the unfused formula as PEFT runs it, `base(x) + B(A(dropout(x))) * s` with nn.Linear
         modules (DoRA: PEFT's DoraLinearLayer arithmetic, norm of the formed W + s B A),
  ours   lorabench.ops.lora_linear / dora_linear with kernel="fused",
forward and forward+backward (gradients for x, A, B as in training; W frozen), over tokens x
(in, out) x rank. Every round times base, eager and ours back to back (torch.utils.benchmark
Timer; calls batched into ~10 ms samples; the order rotates); the reported time is the median over
rounds, so drift on a shared machine hits all three alike. The limit is zero overhead
(docs/architecture.md, "Measurement protocol").

Other op families register their own benchmark here (lazily, "module:function" or a callable):
    OP_BENCHES["nf4_linear"] = "lorabench.bench.quant:bench"
A bench takes the Config and returns a list of dataclass rows; this module prints them as a
table and writes {config, environment, command, rows, summary} to results/kernels/OP_DEVICE.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.utils.benchmark as tb

TOKENS = (1, 16, 512, 4096)
# (in, out): SmolLM2-135M attention and MLP (576, 1536), a BERT-large layer, Llama-7B attention and MLP.
SHAPES = ((576, 576), (576, 1536), (1024, 1024), (4096, 4096), (4096, 11008))
RANKS = (8, 16, 64)


@dataclass(frozen=True)
class Config:
    op: str = "lora_linear"
    tokens: tuple[int, ...] = TOKENS
    shapes: tuple[tuple[int, int], ...] = SHAPES
    ranks: tuple[int, ...] = RANKS
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    dtype: str = "float32"
    device: str = "cpu"
    bias: bool = True
    dropout_p: float = 0.0    # PEFT's default; eager then uses nn.Identity, as PEFT does
    scale: float = 2.0        # lora_alpha / r with PEFT's alpha = 2 r
    rounds: int = 15          # interleaved rounds (fewer when over round_budget_s); median reported
    sample_s: float = 0.01    # one sample = enough calls to last this long (at least one call)
    round_budget_s: float = 30.0  # per (shape, rank, mode): cap on rounds x samples, but >= 3 rounds
    threads: int = 0          # 0: torch's default
    clock: str = "wall"       # "cpu": CPU time of the calling thread (needs threads=1); on an oversubscribed
                              # machine it leaves out the time the thread waits preempted, wall time does not
    max_gflop: float = 0.0    # skip (tokens, in, out) whose base GEMM exceeds this (0: no limit); a 2-core
                              # CPU needs minutes per 4096 x 4096 x 11008 GEMM with backward
    options: tuple[tuple[str, str], ...] = ()  # op-specific key=value settings for registered benches

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {self.dtype!r}: valid are float32, bfloat16, float16")
        if not set(self.modes) <= {"fwd", "fwd+bwd"}:
            raise ValueError(f"modes {self.modes}: valid are fwd, fwd+bwd")
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"clock {self.clock!r}: valid are wall, cpu")
        if self.clock == "cpu" and (self.threads != 1 or self.device != "cpu"):
            raise ValueError("clock 'cpu' measures one thread: it needs --threads 1 and --device cpu")
        if self.rounds < 1:
            raise ValueError("rounds must be >= 1")


@dataclass
class Result:
    op: str
    mode: str
    tokens: int
    n_in: int
    n_out: int
    rank: int
    base_us: float
    eager_us: float
    ours_us: float
    eager_overhead_pct: float   # 100 (t_eager / t_base - 1)
    ours_overhead_pct: float    # 100 (t_ours / t_base - 1)
    overhead_ratio: float       # ours_overhead / eager_overhead (target <= 0.5 at tokens >= 512, fwd+bwd)
    speedup_vs_eager: float     # t_eager / t_ours
    ours_vs_eager_min: float    # min over rounds of t_ours / t_eager: > 1 means slower in every round
    ours_vs_eager_max: float


# --- the LoRA / DoRA variants ---------------------------------------------------------------------

def _lora_inputs(cfg: Config, tokens: int, n_in: int, n_out: int, rank: int, magnitude: bool):
    to = dict(dtype=getattr(torch, cfg.dtype), device=cfg.device)
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(n_in, n_out, bias=cfg.bias).to(**to).requires_grad_(False)
    lin_a = torch.nn.Linear(n_in, rank, bias=False).to(**to)
    lin_b = torch.nn.Linear(rank, n_out, bias=False).to(**to)
    with torch.no_grad():  # a trained adapter (B != 0), not the zero init
        lin_b.weight.copy_(torch.randn(n_out, rank, generator=g) / rank)
    x = torch.randn(tokens, n_in, generator=g).to(**to)
    m = torch.linalg.norm(base.weight.float(), dim=1).to(**to).requires_grad_(True) if magnitude else None
    return base, lin_a, lin_b, x, m


def _variants(cfg: Config, op: str, base, lin_a, lin_b, m):
    """name -> (f(x) -> y, tensors the backward differentiates besides x)."""
    s, p = cfg.scale, cfg.dropout_p
    drop = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()
    from lorabench.ops import dora_linear, lora_linear
    W, b, A, B = base.weight, base.bias, lin_a.weight, lin_b.weight
    if op == "lora_linear":
        eager = lambda x: base(x) + lin_b(lin_a(drop(x))) * s  # noqa: E731  (PEFT's Linear.forward)
        ours = lambda x: lora_linear(x, W, b, A, B, s, p, training=True)  # noqa: E731
        params = (A, B)
    else:
        def eager(x):  # PEFT's DoraLinearLayer.forward + Linear.forward, no dropout
            result = base(x)
            lora_weight = lin_b(lin_a(torch.eye(W.shape[1], dtype=x.dtype, device=x.device))).T
            norm = torch.linalg.norm(W + s * lora_weight.detach(), dim=1).to(W.dtype).detach()
            g = (m / norm).view(1, -1)
            base_result = result - b if b is not None else result
            return result + (g - 1) * base_result + g * lin_b(lin_a(x)) * s
        ours = lambda x: dora_linear(x, W, b, A, B, m, s, p, training=True)  # noqa: E731
        params = (A, B, m)
    return {"base": (base, ()), "eager": (eager, params), "ours": (ours, params)}


def _timer(fn, x, params, mode, clock="wall"):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(x)
    else:
        xg = x.detach().requires_grad_(True)
        gy = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)  # broadcast below

        def step():
            y = fn(xg)
            torch.autograd.grad(y, (xg, *params), gy.expand_as(y))
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    kw = {"timer": time.thread_time} if clock == "cpu" else {}
    return tb.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads(), **kw)


def _interleaved(timers: dict, cfg: Config) -> dict[str, list[float]]:
    """Seconds per call of each timer, one sample per timer per round, rounds interleaved (the order
    rotates every round): on a shared machine, load changes hit every variant alike."""
    numbers, one_round = {}, 0.0
    for k, t in timers.items():
        t.timeit(1)  # warm-up: allocator, BLAS threads, autograd graph
        one = min(t.timeit(1).mean for _ in range(2))
        numbers[k] = max(1, int(cfg.sample_s / one))
        one_round += numbers[k] * one
    rounds = max(3, min(cfg.rounds, int(cfg.round_budget_s / one_round)))
    names = list(timers)
    per_round = {k: [] for k in names}
    for i in range(rounds):
        for k in names[i % len(names):] + names[:i % len(names)]:
            per_round[k].append(timers[k].timeit(numbers[k]).mean)
    return per_round


def bench_lora(cfg: Config, log=print) -> list[Result]:
    op = cfg.op
    rows = []
    for n_in, n_out in cfg.shapes:
        for rank in cfg.ranks:
            for tokens in cfg.tokens:
                if cfg.max_gflop and 2 * tokens * n_in * n_out / 1e9 > cfg.max_gflop:
                    log(f"skipped tokens={tokens} {n_in}x{n_out} rank={rank}: base GEMM above --max-gflop")
                    continue
                base, lin_a, lin_b, x, m = _lora_inputs(cfg, tokens, n_in, n_out, rank, op == "dora_linear")
                variants = _variants(cfg, op, base, lin_a, lin_b, m)
                for mode in cfg.modes:
                    per_round = _interleaved({k: _timer(f, x, ps, mode, cfg.clock) for k, (f, ps) in variants.items()}, cfg)
                    med = {k: statistics.median(v) for k, v in per_round.items()}
                    ratios = [o / e for o, e in zip(per_round["ours"], per_round["eager"])]
                    eo, oo = med["eager"] / med["base"] - 1, med["ours"] / med["base"] - 1
                    rows.append(Result(
                        op=op, mode=mode, tokens=tokens, n_in=n_in, n_out=n_out, rank=rank,
                        base_us=med["base"] * 1e6, eager_us=med["eager"] * 1e6, ours_us=med["ours"] * 1e6,
                        eager_overhead_pct=100 * eo, ours_overhead_pct=100 * oo,
                        overhead_ratio=oo / eo if eo > 0 else float("nan"),
                        speedup_vs_eager=med["eager"] / med["ours"],
                        ours_vs_eager_min=min(ratios), ours_vs_eager_max=max(ratios)))
                    log(format_row(rows[-1]))
    return rows


def summarize_lora(rows: list[Result]) -> dict:
    """The issue's CPU targets, checked on this run's numbers."""
    big = [r for r in rows if r.mode == "fwd+bwd" and r.tokens >= 512]
    slower = [r for r in rows if r.ours_vs_eager_min > 1.0]  # slower than eager in every round
    return {
        "fwd+bwd_tokens>=512_cases": len(big),
        "fwd+bwd_tokens>=512_ratio<=0.5": sum(r.overhead_ratio <= 0.5 for r in big),
        "fwd+bwd_tokens>=512_median_overhead_ratio": statistics.median([r.overhead_ratio for r in big]) if big else None,
        "cases": len(rows),
        "cases_slower_than_eager_in_every_round": len(slower),
        "median_speedup_vs_eager": statistics.median([r.speedup_vs_eager for r in rows]) if rows else None,
    }


# --- registry, table, main --------------------------------------------------------------------

OP_BENCHES: dict[str, Callable | str] = {
    "lora_linear": bench_lora,
    "dora_linear": bench_lora,
    "lora_e2e": "lorabench.bench.lora_e2e:bench",  # SmolLM2-135M LoRA fine-tuning, lorabench vs peft
}
# Optional: op -> rows -> dict of headline numbers (the targets), printed and saved.
SUMMARIES: dict[str, Callable | str] = {"lora_linear": summarize_lora, "dora_linear": summarize_lora,
                                        "lora_e2e": "lorabench.bench.lora_e2e:summarize"}
import lorabench.bench.quant  # noqa: E402,F401  registers nf4_linear and int4_linear (4-bit kernels)


def _lazy(table: dict, name: str) -> Callable:
    fn = table[name]
    if isinstance(fn, str):  # "module:function", imported on first use
        module, attr = fn.split(":")
        fn = table[name] = getattr(importlib.import_module(module), attr)
    return fn


def resolve(name: str) -> Callable:
    if name not in OP_BENCHES:
        raise ValueError(f"unknown op {name!r}; valid: {', '.join(sorted(OP_BENCHES))}")
    return _lazy(OP_BENCHES, name)


def format_row(row) -> str:
    return "  ".join(_fmt(v) for v in asdict(row).values())


def _fmt(v) -> str:
    return f"{v:10.3g}" if isinstance(v, float) else f"{v!s:>8}"


def table(rows: list) -> str:
    if not rows:
        return "(no rows)"
    names = [f.name for f in dataclasses.fields(rows[0])]
    widths = [max(len(n), 10) for n in names]
    lines = ["  ".join(n.rjust(w) for n, w in zip(names, widths))]
    for r in rows:
        vals = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in asdict(r).values()]
        lines.append("  ".join(v.rjust(w) for v, w in zip(vals, widths)))
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,16,512") from None


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple(tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s)  # type: ignore
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected INxOUT,..., e.g. 576x576,4096x11008") from None


def main(argv: list[str]) -> int:
    d = Config()
    p = argparse.ArgumentParser(prog="python -m lorabench bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default=d.op, help=f"op to benchmark; registered: {', '.join(sorted(OP_BENCHES))}")
    p.add_argument("--tokens", type=_ints, default=d.tokens, help="comma-separated token counts")
    p.add_argument("--shapes", type=_shapes, default=d.shapes, help="comma-separated INxOUT, e.g. 576x1536")
    p.add_argument("--ranks", type=_ints, default=d.ranks, help="comma-separated LoRA ranks")
    p.add_argument("--modes", default=",".join(d.modes), help="fwd, fwd+bwd or both (comma-separated)")
    p.add_argument("--dtype", default=d.dtype, help="float32, bfloat16 or float16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bias", action="store_true", help="base linear without bias")
    p.add_argument("--dropout", type=float, default=d.dropout_p, help="LoRA dropout p (training mode)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="interleaved rounds (median reported)")
    p.add_argument("--sample", type=float, default=d.sample_s, help="seconds per sample (calls are batched)")
    p.add_argument("--round-budget", type=float, default=d.round_budget_s,
                   help="seconds of samples per (shape, rank, mode) before fewer rounds are run (>= 3)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: default)")
    p.add_argument("--clock", default=d.clock, help="wall, or cpu (thread CPU time; needs --threads 1)")
    p.add_argument("--max-gflop", type=float, default=d.max_gflop,
                   help="skip shapes whose base GEMM exceeds this many GFLOP (0: no limit)")
    p.add_argument("--option", action="append", default=[], help="op-specific KEY=VALUE (repeatable)")
    p.add_argument("--out", default="results/kernels", help="directory for OP_DEVICE.json ('' to skip)")
    a = p.parse_args(argv)
    try:
        cfg = Config(op=a.op, tokens=a.tokens, shapes=a.shapes, ranks=a.ranks, modes=tuple(a.modes.split(",")),
                     dtype=a.dtype, device=a.device, bias=not a.no_bias, dropout_p=a.dropout, rounds=a.rounds,
                     sample_s=a.sample, round_budget_s=a.round_budget, threads=a.threads, clock=a.clock, max_gflop=a.max_gflop,
                     options=tuple(tuple(o.split("=", 1)) for o in a.option))  # type: ignore[misc]
        bench = resolve(cfg.op)
    except ValueError as e:
        p.error(str(e))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from lorabench.measure.provenance import environment
    from lorabench.ops import available_backends
    print(f"bench kernels --op {cfg.op} on {cfg.device} ({cfg.dtype}), backends: "
          + ", ".join(f"{k}={'yes' if ok else 'no'}" for k, (ok, _) in available_backends().items()))
    start = time.time()
    rows = bench(cfg)
    summary = _lazy(SUMMARIES, cfg.op)(rows) if cfg.op in SUMMARIES else {}
    print()
    print(table(rows))
    for k, v in summary.items():
        print(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"{cfg.op}_{cfg.device}.json")
        report = {"config": asdict(cfg), "command": "python -m lorabench bench kernels " + " ".join(argv),
                  "environment": environment(), "backends": {k: v[1] for k, v in available_backends().items()},
                  "wall_s": time.time() - start, "summary": summary, "rows": [asdict(r) for r in rows]}
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {path} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
