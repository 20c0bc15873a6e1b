"""Per-example adapters in one batch: fLoRA's element-wise form against the BGMV op and a loop over adapters.

Fast LoRA (arXiv 2312.05677, lorabench/methods/cross_task/fast_lora.py) serves a batch whose examples each carry
their own adapter. Three ways to compute one adapted linear layer's forward for such a batch, N examples of T
tokens, adapter l(i) of example i among `adapters`, rank r:

- `flora`: y_i = Σ_j a_ij ∘ (W0 (b_ij ∘ x_i)), one GEMM with W0 over r x N x T rows (fLoRA's batched form);
- `bgmv`:  y = W0 x + BGMV_expand(BGMV_shrink(x, A, idx), B, idx), LoRA with an adapter index per token through
  lorabench.ops (the compiled CPU kernel where built, else the reference), idx = l(i) repeated over i's tokens;
- `loop`:  for each adapter l of the batch, its rows: W0 x + s B_l A_l x (a loop over adapters, LoRA);
- `base`:  W0 x alone, no adapter (the floor: what serving the base model costs).

`bench(cfg)` times the three forward passes (no gradient: serving) interleaved, rounds rotating their order, and
reports tokens/s and the ratios against the loop; absolute numbers depend on the machine's load, the ratios are
what a run shows. tests/bench/test_bench_fast_lora.py records the same three as pytest-benchmark entries.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import torch.utils.benchmark as tb

from lorabench.methods.cross_task.fast_lora import flora_forward


@dataclass(frozen=True)
class Config:
    examples: int = 8          # N: examples in the batch, each with its own adapter (round-robin over `adapters`)
    tokens: int = 64           # T: tokens per example
    n_in: int = 576            # SmolLM2-135M's hidden size
    n_out: int = 576
    rank: int = 1              # fLoRA is meant for low ranks: its cost grows with r
    adapters: int = 8
    rounds: int = 5
    seconds: float = 0.3       # per sample of each variant


@dataclass
class Result:
    variant: str
    rank: int
    tokens_per_s: float
    ms_per_batch: float
    vs_loop: float             # tokens/s against the loop over adapters, measured interleaved (> 1: faster)


def inputs(cfg: Config, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    N, T, r, L = cfg.examples, cfg.tokens, cfg.rank, cfg.adapters
    return {
        "x": torch.randn(N, T, cfg.n_in, generator=g),
        "W": torch.randn(cfg.n_out, cfg.n_in, generator=g) / cfg.n_in ** 0.5,
        "bias": torch.zeros(cfg.n_out),
        "ids": torch.arange(N) % L,                                          # l(i)
        "fa": 1 + 0.1 * torch.randn(L, r, cfg.n_out, generator=g),           # fLoRA's a_lj
        "fb": 1 + 0.1 * torch.randn(L, r, cfg.n_in, generator=g),            # ... and b_lj
        "A": torch.randn(L, r, cfg.n_in, generator=g) / cfg.n_in ** 0.5,     # LoRA's A_l (BGMV's slot layout)
        "B": torch.randn(L, cfg.n_out, r, generator=g) / r,                  # LoRA's B_l
        "ranks": torch.full((L,), r, dtype=torch.int64),
        "scales": torch.full((L,), 2.0),
    }


def variants(d: dict) -> dict:
    from lorabench.ops import multi_lora as ops
    x, W, bias, ids = d["x"], d["W"], d["bias"], d["ids"]
    N, T, k = x.shape

    def flora():
        return flora_forward(x, W, bias, d["fa"][ids], d["fb"][ids])

    tok_idx = ids.repeat_interleave(T)                                          # one adapter index per token

    def bgmv():
        x2 = x.reshape(N * T, k)
        out = F.linear(x2, W, bias)
        y = ops.bgmv_shrink(x2, d["A"], tok_idx, d["ranks"], d["scales"])
        return ops.bgmv_expand(out, y, d["B"], tok_idx, d["ranks"]).reshape(N, T, -1)

    def loop():
        out = torch.empty(N, T, W.shape[0])
        for l in ids.unique().tolist():
            rows = (ids == l).nonzero().flatten()
            xl = x[rows]
            out[rows] = F.linear(xl, W, bias) + float(d["scales"][l]) * (xl @ d["A"][l].T) @ d["B"][l].T
        return out

    def base():
        return F.linear(x, W, bias)

    return {"flora": flora, "bgmv": bgmv, "loop": loop, "base": base}


def bench(cfg: Config = Config(), log=print) -> list[Result]:
    fns = variants(inputs(cfg))
    timers = {k: tb.Timer("f()", globals={"f": f}, num_threads=torch.get_num_threads()) for k, f in fns.items()}
    numbers = {}
    for k, t in timers.items():
        t.timeit(2)                                                              # warm-up
        numbers[k] = max(1, int(cfg.seconds / max(t.timeit(1).mean, 1e-6)))
    names = list(timers)
    per = {k: [] for k in names}
    for i in range(cfg.rounds):                                                  # interleaved, order rotating
        for k in names[i % len(names):] + names[:i % len(names)]:
            per[k].append(timers[k].timeit(numbers[k]).mean)
    tokens = cfg.examples * cfg.tokens
    med = {k: statistics.median(v) for k, v in per.items()}
    rows = [Result(k, cfg.rank, round(tokens / med[k], 1), round(1e3 * med[k], 3), round(med["loop"] / med[k], 3))
            for k in names]
    for r in rows:
        log(f"{r.variant:6s} rank {r.rank}: {r.tokens_per_s:10.1f} tokens/s  {r.ms_per_batch:8.3f} ms  "
            f"x{r.vs_loop:.2f} vs loop")
    return rows


def main(ranks=(1, 2, 4, 8), **options) -> list[dict]:
    return [asdict(r) for rank in ranks for r in bench(Config(rank=rank, **options))]
