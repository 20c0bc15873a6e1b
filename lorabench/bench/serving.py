"""`python -m lorabench bench serving`: throughput of one base model serving N LoRA adapters.

Decode (one new token per request) and prefill (a prompt per request) throughput in tokens/s on a
Llama-shaped model with random weights, for N adapters in {1, 8, 64, 256, 1024}, against:
  base     the base model with no adapter (the limit),
  merged   one adapter merged into the weights (W + s B A): the cost of serving a single adapter,
  ours     lorabench.serving.MultiLoraModel: base GEMM once + BGMV (decode) / SGMV (prefill),
           adapters paged between host memory and `capacity` fast-memory slots (LRU),
  peft     PEFT's mixed-batch forward, `model(input_ids, adapter_names=[...])`,
  loop     a Python loop over the batch's adapters: one PEFT forward per adapter, over its requests.
Every configuration is timed once per round, rounds interleaved (docs/architecture.md, "Measurement protocol": ratios measured in one run);
the result is the median over rounds. A batch draws its requests' adapters from the N loaded
ones: all distinct when N >= batch, else each adapter batch/N times; a fresh draw every round (the
same draw for every method), so with N > capacity the store really swaps adapters in and out.
Decode runs without a KV cache (a (batch, 1) forward): the attention over the context costs the same
with and without adapters, so leaving it out makes the adapters' share of the time larger, not smaller.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field

import torch

from lorabench.serving import MultiLoraModel, random_adapter

# Llama-shaped presets (gpt-fast style); CPU default is small enough for a 2-core machine.
PRESETS = {
    # SmolLM2-135M's layer shapes (a Llama: hidden 576, MLP 1536, 9 heads / 3 KV heads), 4 of its 30
    # layers; vocabulary cut from 49152 to 8192 so the output layer keeps about the share of the time
    # it has in the 30-layer model (~20%) instead of dominating 4 layers.
    "smollm2-135m-4l": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                            num_key_value_heads=3, num_hidden_layers=4, vocab_size=8192),
    # Llama-2-7B's layer shapes, 2 layers (for a machine with a GPU, or patience).
    "llama-7b-2l": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                        num_key_value_heads=32, num_hidden_layers=2, vocab_size=4096),
}
RANKS = (8, 16, 32)  # adapter i has rank RANKS[i % 3]: heterogeneous ranks in every batch


@dataclass(frozen=True)
class Config:
    preset: str = "smollm2-135m-4l"
    n_adapters: tuple[int, ...] = (1, 8, 64, 256, 1024)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # PEFT's default for Llama
    decode_batch: int = 64
    prefill_batch: int = 8
    prefill_len: int = 32
    # fast-memory slots of the adapter store; 0: as many as adapters served (N), the CPU default: on CPU
    # fast and host memory are the same RAM, so paging would copy RAM to RAM for nothing. A capacity
    # below N (e.g. 128) measures the LRU paging itself (S-LoRA's GPU setting).
    capacity: int = 0
    rounds: int = 5
    methods: tuple[str, ...] = ("base", "merged", "ours", "peft", "loop")
    device: str = "cpu"
    dtype: str = "float32"
    # One intra-op thread by default: on a shared, oversubscribed CPU a preempted OpenMP thread stalls
    # every parallel region (measured here: a decode step 10x slower and far noisier with 2 threads).
    threads: int = 1
    # "wall" (perf_counter) or "cpu": the thread's CPU time (time.thread_time, needs threads=1 and a CPU
    # device), which on a shared, loaded machine leaves out the time the process waits to be scheduled
    clock: str = "wall"
    seed: int = 0


@dataclass
class Result:
    phase: str
    method: str
    n_adapters: int | None
    tokens: int
    median_s: float
    tokens_per_s: float
    times_s: list[float] = field(default_factory=list)


def _build_models(cfg: Config):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    base = LlamaForCausalLM(LlamaConfig(**PRESETS[cfg.preset])).to(cfg.device, dtype).eval().requires_grad_(False)
    shapes = {n: (m.in_features, m.out_features) for n, m in base.named_modules()
              if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in cfg.target_modules}
    n_max = max(cfg.n_adapters)
    adapters = [random_adapter(f"a{i}", shapes, RANKS[i % len(RANKS)], 2.0 * RANKS[i % len(RANKS)], seed=i)
                for i in range(n_max)]
    models = {"base": base}
    if "merged" in cfg.methods:
        merged = copy.deepcopy(base)
        with torch.no_grad():
            for p in shapes:
                merged.get_submodule(p).weight += adapters[0].delta(p).to(dtype)
        models["merged"] = merged
    # One multi-adapter model and one PEFT model per N, holding exactly N adapters: a model shared by
    # all N would let the N=1024 batches evict the N=8 adapters between interleaved runs, and would
    # charge PEFT at N=1 for walking 1024 loaded adapters.
    for n in cfg.n_adapters:
        if "ours" in cfg.methods:
            ours = MultiLoraModel(copy.deepcopy(base), target_modules=cfg.target_modules,
                                  capacity=cfg.capacity or n, max_rank=max(RANKS))
            for a in adapters[:n]:
                ours.add_adapter(a)
            models[("ours", n)] = ours
        if "peft" in cfg.methods or "loop" in cfg.methods:
            models[("peft", n)] = _peft_model(copy.deepcopy(base), adapters[:n], shapes, cfg)
    return models, adapters


def _peft_model(base, adapters, shapes, cfg: Config):
    """A PeftModel holding every adapter. The first goes through `get_peft_model`; the others are
    written into each LoraLayer's per-adapter dicts directly (the state `LoraLayer.update_layer`
    creates for plain LoRA): PEFT's `add_adapter` costs time quadratic in the adapters loaded (measured
    here on a tiny model: 15 s for 64, 43 s more for the next 64), too slow for 1024. The forward that
    is timed is PEFT's own."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from torch import nn

    def lora_config(r):
        return LoraConfig(r=r, lora_alpha=2.0 * r, target_modules=list(cfg.target_modules), lora_dropout=0.0,
                          init_lora_weights=False)

    first = adapters[0]
    model = get_peft_model(base, lora_config(first.weights[next(iter(shapes))][0].shape[0]), adapter_name=first.name)
    layers = {name.removeprefix("base_model.model."): mod for name, mod in model.named_modules()
              if isinstance(mod, LoraLayer)}
    assert set(layers) == set(shapes), f"PEFT adapted {sorted(layers)[:3]}..., expected {sorted(shapes)[:3]}..."
    dtype, device = getattr(torch, cfg.dtype), torch.device(cfg.device)
    with torch.no_grad():
        for a in adapters:
            r = next(iter(a.weights.values()))[0].shape[0]
            if a.name != first.name:
                model.peft_config[a.name] = lora_config(r)
            for path, mod in layers.items():
                A, B = a.weights[path]
                if a.name != first.name:
                    mod.r[a.name], mod.lora_alpha[a.name] = r, 2.0 * r
                    mod.scaling[a.name] = a.scales[path]
                    mod.lora_dropout[a.name] = nn.Identity()
                    mod.lora_A[a.name] = nn.Linear(A.shape[1], r, bias=False, device=device, dtype=dtype)
                    mod.lora_B[a.name] = nn.Linear(r, B.shape[0], bias=False, device=device, dtype=dtype)
                    mod.lora_bias[a.name], mod.use_rslora[a.name], mod.use_dora[a.name] = False, False, False
                mod.lora_A[a.name].weight.copy_(A)
                mod.lora_B[a.name].weight.copy_(B)
    return model.eval().requires_grad_(False)


def _draw(n: int, batch: int, g: torch.Generator) -> list[str]:
    if n >= batch:
        chosen = torch.randperm(n, generator=g)[:batch].tolist()
    else:
        chosen = [i % n for i in range(batch)]
    return [f"a{i}" for i in chosen]


def _forward(method: str, n: int | None, models: dict, ids: torch.Tensor, names: list[str]) -> None:
    if method in ("base", "merged"):
        models[method](ids)
    elif method == "ours":
        models[("ours", n)](ids, adapter_names=names)
    elif method == "peft":
        models[("peft", n)](ids, adapter_names=names)
    elif method == "loop":  # one forward per adapter of the batch, over that adapter's requests
        peft_model = models[("peft", n)]
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            # adapter_names=[name] * k rather than set_adapter(name): set_adapter touches every loaded
            # adapter of every layer (requires_grad_), which would charge the loop for the 1024 loaded
            peft_model(ids[rows], adapter_names=[name] * len(rows))
    else:
        raise AssertionError(method)


def run(cfg: Config, log=print) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    models, _ = _build_models(cfg)
    log(f"built models and {max(cfg.n_adapters)} adapters in {time.perf_counter() - t0:.1f} s")
    check = _check_agreement(models, cfg)
    vocab = PRESETS[cfg.preset]["vocab_size"]
    phases = {"decode": (cfg.decode_batch, 1), "prefill": (cfg.prefill_batch, cfg.prefill_len)}
    configs = [(m, None) for m in cfg.methods if m in ("base", "merged")]
    configs += [(m, n) for n in cfg.n_adapters for m in cfg.methods if m in ("ours", "peft", "loop")]
    results = []
    now = time.thread_time if cfg.clock == "cpu" else time.perf_counter
    for phase, (batch, seq) in phases.items():
        g = torch.Generator().manual_seed(cfg.seed)
        times = {c: [] for c in configs}
        for rnd in range(cfg.rounds + 1):  # round 0 warms up (allocations, first loads) and is dropped
            ids = torch.randint(0, vocab, (batch, seq), generator=g, device=cfg.device)
            draws = {n: _draw(n, batch, g) for n in cfg.n_adapters}
            for method, n in configs:
                with torch.inference_mode():
                    start = now()
                    _forward(method, n, models, ids, draws[n] if n else [])
                    if cfg.device == "cuda":
                        torch.cuda.synchronize()
                    elapsed = now() - start
                if rnd:
                    times[(method, n)].append(elapsed)
            log(f"{phase} round {rnd}/{cfg.rounds} done ({time.perf_counter() - t0:.0f} s)")
        for (method, n), ts in times.items():
            med = statistics.median(ts)
            results.append(Result(phase, method, n, batch * seq, med, batch * seq / med, ts))
    stores = {n: models[("ours", n)].store for n in cfg.n_adapters if ("ours", n) in models}
    return {"config": asdict(cfg), "model": PRESETS[cfg.preset], "ranks": list(RANKS),
            "results": [asdict(r) for r in results], "ratios": _ratios(results, cfg), "agreement": check,
            "store": {str(n): {"loads": st.loads, "hits": st.hits, "evictions": st.evictions,
                               "fast_mib": round(st.fast_bytes() / 2**20, 1)} for n, st in stores.items()},
            "environment": _environment(), "wall_s": time.perf_counter() - t0}


def _check_agreement(models: dict, cfg: Config) -> dict:
    """Before timing: every method computes the same logits for one mixed batch (else the race is void)."""
    n = max(cfg.n_adapters)
    names = [f"a{(i * 7) % n}" for i in range(8)]
    ids = torch.randint(0, PRESETS[cfg.preset]["vocab_size"], (8, 4), generator=torch.Generator().manual_seed(1))
    ids = ids.to(cfg.device)
    with torch.inference_mode():
        ref = models[("ours", n)](ids, adapter_names=names).logits.float() if ("ours", n) in models else None
        diffs = {}
        if ref is not None and ("peft", n) in models:
            diffs["peft_mixed"] = (models[("peft", n)](ids, adapter_names=names).logits.float() - ref).abs().max().item()
        if ref is not None and "merged" in models:
            diffs["merged_a0"] = (models["merged"](ids[:1]).logits.float() - ref[:1]).abs().max().item()
    tol = 1e-3 if cfg.dtype == "float32" else 5e-2
    bad = {k: v for k, v in diffs.items() if v > tol * (1 + ref.abs().max().item())}
    if bad:
        raise AssertionError(f"methods disagree with lorabench's multi-adapter model: {bad}")
    return {"max_abs_logit_diff_vs_ours": diffs}


def _ratios(results: list[Result], cfg: Config) -> dict:
    tps = {(r.phase, r.method, r.n_adapters): r.tokens_per_s for r in results}
    out = {}
    for phase in ("decode", "prefill"):
        for n in cfg.n_adapters:
            if ("ours" in cfg.methods and "peft" in cfg.methods):
                out[f"{phase}_ours_over_peft_n{n}"] = tps[(phase, "ours", n)] / tps[(phase, "peft", n)]
            if ("ours" in cfg.methods and "base" in cfg.methods):
                out[f"{phase}_slowdown_vs_base_n{n}"] = 1 - tps[(phase, "ours", n)] / tps[(phase, "base", None)]
        if "ours" in cfg.methods:
            lo, hi = min(cfg.n_adapters), max(cfg.n_adapters)
            out[f"{phase}_drop_n{lo}_to_n{hi}"] = 1 - tps[(phase, "ours", hi)] / tps[(phase, "ours", lo)]
    return out


def _environment() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import peft
    import transformers
    from lorabench.ops import available_backends
    return {"git_commit": git("rev-parse", "HEAD"), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "cpu": cpu, "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "backends": {k: v[1] for k, v in available_backends().items()}}


def table(report: dict) -> str:
    """Markdown: tokens/s per method (rows) and N (columns), per phase."""
    cfg = report["config"]
    lines = []
    for phase in ("decode", "prefill"):
        rows = [r for r in report["results"] if r["phase"] == phase]
        ns = cfg["n_adapters"]
        clock = cfg.get("clock", "wall")
        lines += [f"**{phase}** (tokens/s, median of {cfg['rounds']} interleaved rounds, {clock} clock)", "",
                  "| method | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns)]
        for m in cfg["methods"]:
            cells = []
            for n in ns:
                r = next((r for r in rows if r["method"] == m and r["n_adapters"] in (n, None)), None)
                cells.append(f"{r['tokens_per_s']:.0f}" if r else "")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg = report["config"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, phase in zip(axes, ("decode", "prefill")):
        rows = [r for r in report["results"] if r["phase"] == phase]
        for m in cfg["methods"]:
            pts = [r for r in rows if r["method"] == m]
            if pts and pts[0]["n_adapters"] is None:
                ax.axhline(pts[0]["tokens_per_s"], ls="--", lw=1, label=m, color="k" if m == "base" else "gray")
            elif pts:
                ax.plot([r["n_adapters"] for r in pts], [r["tokens_per_s"] for r in pts], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("adapters served (N)")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{phase}: {cfg['preset']}, batch {cfg['decode_batch'] if phase == 'decode' else cfg['prefill_batch']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"adapter counts must be >= 1, got {text!r}")
    return values


def main(argv: list[str]) -> int:
    d = Config()
    p = argparse.ArgumentParser(prog="python -m lorabench bench serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=d.preset, choices=sorted(PRESETS), help="Llama-shaped model")
    p.add_argument("--n-adapters", type=_ints, default=d.n_adapters, help="comma-separated N values")
    p.add_argument("--methods", default=",".join(d.methods),
                   help=f"comma-separated subset of {','.join(d.methods)}")
    p.add_argument("--decode-batch", type=int, default=d.decode_batch)
    p.add_argument("--prefill-batch", type=int, default=d.prefill_batch)
    p.add_argument("--prefill-len", type=int, default=d.prefill_len)
    p.add_argument("--capacity", type=int, default=d.capacity,
                   help="fast-memory adapter slots; 0 (default): N, every adapter resident (on CPU fast and host "
                        "memory are the same RAM); below N the store pages adapters in and out (LRU)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="timed rounds (after one warm-up round)")
    p.add_argument("--device", default=d.device, choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=d.threads, help="torch intra-op threads")
    p.add_argument("--clock", default=d.clock, choices=("wall", "cpu"),
                   help="wall, or cpu (the thread's CPU time; needs --threads 1 and --device cpu)")
    p.add_argument("--out", default="results/serving", help="directory for serving.json and the plot")
    a = p.parse_args(argv)
    methods = tuple(m for m in a.methods.split(",") if m)
    bad = [m for m in methods if m not in d.methods]
    if bad:
        p.error(f"unknown methods {bad}; valid: {', '.join(d.methods)}")
    if a.clock == "cpu" and (a.threads != 1 or a.device != "cpu"):
        p.error("--clock cpu measures one thread's CPU time: it needs --threads 1 and --device cpu")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU visible to torch")
    cfg = Config(a.preset, a.n_adapters, d.target_modules, a.decode_batch, a.prefill_batch, a.prefill_len,
                 a.capacity, a.rounds, methods, a.device, a.dtype, a.threads, a.clock)
    report = run(cfg, log=lambda s: print(s, flush=True))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "serving.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(report, os.path.join(a.out, "throughput_vs_n.png"))
    print(table(report))
    for k, v in report["ratios"].items():
        print(f"{k}: {v:.3f}")
    print(f"wrote {a.out}/serving.json and {a.out}/throughput_vs_n.png ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    import sys
    raise SystemExit(main(sys.argv[1:]))
