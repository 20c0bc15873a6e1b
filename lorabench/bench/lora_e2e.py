"""`python -m lorabench bench kernels --op lora_e2e`: LoRA fine-tuning of SmolLM2-135M end to end,
lorabench against peft + transformers, on the same batches, measured in one run.

LoRA rank 16, alpha 32, on every linear layer of the transformer blocks (q, k, v, o, gate, up, down;
not the tied lm_head), AdamW, a fixed number of steps on seeded random token batches (the speed of a
step does not depend on the text). Variants:
  ours      lorabench's `lora` method, kernel="fused" (lorabench::lora_linear, C++ autograd),
  ours_ref  lorabench's `lora` method, kernel="reference" (the eager formula, for attribution),
  peft      peft.get_peft_model(model, LoraConfig(...)), PEFT's Linear.forward,
  base      the same frozen model with no adapter, trained "for nothing": a forward hook makes the output
            of every target linear require grad, so the backward runs through every layer as it does
            with LoRA (every input gradient LoRA needs, no weight gradient, no optimizer: nothing is
            trainable). It is the limit a zero-cost LoRA path could reach: t(v)/t(base) - 1 is variant
            v's LoRA overhead, and t(peft)/t(base) the highest speedup over peft that any LoRA
            implementation can reach at this shape.
Timing: one subprocess builds every variant (each from the same seed) and runs their steps interleaved,
`warmup` steps of each first, then `rounds` rounds of `steps` steps per variant, the order rotating every
round, so the machine's state (allocator, caches, page faults, other load) falls alike on all of them.
A round's step time is the median of its steps; a variant's, the median over rounds; tokens/s = tokens
per step / that time. (One process per variant, as before 29 Nov 2026, swung by up to 25% between
processes: at 8 x 256 the same variant took 25 or 31 s a step in two processes, 20 s interleaved.)
Peak memory: each variant in its own subprocess (RSS is per process), `warmup` steps and one more.
model="random" builds a random-initialised Llama of SmolLM2-135M's shape (hidden 576, 30 layers, 9
heads, 3 KV heads, MLP 1536, vocabulary 49152, tied embeddings): the same speed as the real weights;
model="smollm2-135m" loads the real asset through lorabench.assets.load_model; model="tiny" is a
2-layer Llama of hidden 64 for the tests.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                    max_position_embeddings=2048)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=128)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("ours", "peft", "ours_ref", "base")


@dataclass
class Result:
    variant: str
    round: int
    tokens_per_s: float         # tokens per step / median step time
    step_ms: float              # median over the round's steps
    peak_rss_mb: float          # the variant's own process's peak resident memory (model, optimizer, activations)
    first_loss: float           # B = 0 at step 0: every variant starts from the same loss
    trainable_params: int
    step_ms_each: list = field(default_factory=list)  # the round's steps, in order


def _options(cfg) -> dict:
    o = dict(model="random", batch=4, seq_len=128, steps=6, warmup=2, rank=16, alpha=32.0, rounds=2,
             variants=",".join(VARIANTS[:2]))
    for k, v in cfg.options:
        if k not in o:
            raise ValueError(f"lora_e2e: unknown option {k!r}; valid: {', '.join(o)}")
        o[k] = type(o[k])(v)
    return o


def _build(variant: str, o: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if o["model"] in ("random", "tiny"):
        model = LlamaForCausalLM(LlamaConfig(**(SMOLLM2_135M if o["model"] == "random" else TINY)))
    else:
        from lorabench.assets import load_model
        model = load_model(o["model"], head="causal-lm").model
    if variant == "base":
        model.requires_grad_(False)
        for name, m in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                m.register_forward_hook(_output_requires_grad)
    elif variant == "peft":
        import peft
        cfg = peft.LoraConfig(r=o["rank"], lora_alpha=o["alpha"], target_modules=TARGETS, lora_dropout=0.0)
        model = peft.get_peft_model(model, cfg)
    else:
        from lorabench.methods.base import ApplyContext
        from lorabench.methods.lora import LoRA, LoraConfig
        method = LoRA(LoraConfig(rank=o["rank"], alpha=o["alpha"], target_modules=TARGETS,
                                 kernel="fused" if variant == "ours" else "reference"))
        model = method.apply(model, ApplyContext(architecture="llama", head_modules=[]))
    return model.train()


def _output_requires_grad(module, args, out):
    """base: a target linear's output enters the autograd graph as a LoRA layer's output does (its
    input may not require grad: layer 0's q/k/v/gate/up read the frozen embedding)."""
    return out if out.requires_grad else out.detach().requires_grad_()


class _Trainer:
    """One variant's model and optimizer; step(ids) runs one training step and returns (loss, seconds)."""

    def __init__(self, variant: str, o: dict, clock: str):
        import torch
        self.model = _build(variant, o)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None  # base: nothing to optimize
        self.now = time.thread_time if clock == "cpu" else time.perf_counter

    def step(self, ids) -> tuple[float, float]:
        t0 = self.now()
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return loss.item(), self.now() - t0


def _batches(o: dict, n: int, vocab: int) -> list:
    import torch
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (o["batch"], o["seq_len"]), generator=g) for _ in range(n)]


def worker(variant: str, o: dict, clock: str) -> dict:
    """One variant alone in this process: `warmup` + `steps` steps; its peak RSS (and its own step times)."""
    t = _Trainer(variant, o, clock)
    times, first_loss = [], None
    for i, ids in enumerate(_batches(o, o["steps"] + o["warmup"], t.model.config.vocab_size)):
        loss, dt = t.step(ids)
        first_loss = loss if first_loss is None else first_loss
        if i >= o["warmup"]:
            times.append(dt)
    step = statistics.median(times)
    return dict(variant=variant, tokens_per_s=o["batch"] * o["seq_len"] / step, step_ms=step * 1e3,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, first_loss=first_loss,
                trainable_params=sum(p.numel() for p in t.params))


def timing_worker(variants: list[str], o: dict, clock: str) -> list[dict]:
    """Every variant in this one process, steps interleaved (see the module docstring): one dict per
    (round, variant) with the round's step times."""
    trainers = {v: _Trainer(v, o, clock) for v in variants}
    batches = _batches(o, o["warmup"] + o["rounds"] * o["steps"], trainers[variants[0]].model.config.vocab_size)
    first = {v: [t.step(ids)[0] for ids in batches[:o["warmup"]]][:1] for v, t in trainers.items()}
    rows = []
    for r in range(o["rounds"]):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:  # rotate the order every round
            ids = batches[o["warmup"] + r * o["steps"]: o["warmup"] + (r + 1) * o["steps"]]
            losses, times = zip(*(trainers[v].step(b) for b in ids))
            first[v] = first[v] or [losses[0]]
            step = statistics.median(times)
            rows.append(dict(variant=v, round=r, tokens_per_s=o["batch"] * o["seq_len"] / step, step_ms=step * 1e3,
                             first_loss=first[v][0], step_ms_each=[t * 1e3 for t in times],
                             trainable_params=sum(p.numel() for p in trainers[v].params)))
    return rows


def _run(args: list[str], cfg) -> str:
    cmd = [sys.executable, "-m", "lorabench.bench.lora_e2e", *args, cfg.clock, str(cfg.threads or 0)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if out.returncode != 0:
        raise RuntimeError(f"lora_e2e worker {args[:2]} failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def bench(cfg, log=print) -> list[Result]:
    o = _options(cfg)
    variants = o["variants"].split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"lora_e2e: unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    rss = {}
    for v in variants:  # peak memory: each variant alone in its own process
        rss[v] = json.loads(_run(["worker", v, json.dumps(dict(o, steps=1))], cfg))["peak_rss_mb"]
        log(f"variant={v}  peak_rss_mb={rss[v]:.0f}  (own process: {o['warmup']} warm-up steps + 1)")
    rows = []
    for d in json.loads(_run(["timing", ",".join(variants), json.dumps(o)], cfg)):
        rows.append(Result(peak_rss_mb=rss[d["variant"]], **d))
        log("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in asdict(rows[-1]).items()
                      if k != "step_ms_each"))
    return rows


def summarize(rows: list[Result]) -> dict:
    """Medians per variant over rounds; against `base` (no adapter, the same backward through every
    layer): overhead_v = t(v)/t(base) - 1 and the bound t(peft)/t(base) on any speedup over peft."""
    variants = sorted({r.variant for r in rows})
    med = {v: statistics.median(r.tokens_per_s for r in rows if r.variant == v) for v in variants}
    step = {v: statistics.median(r.step_ms for r in rows if r.variant == v) for v in variants}
    mem = {v: max(r.peak_rss_mb for r in rows if r.variant == v) for v in variants}
    out = ({f"{v}_tokens_per_s": t for v, t in med.items()} | {f"{v}_step_ms": t for v, t in step.items()}
           | {f"{v}_peak_rss_mb": m for v, m in mem.items()})
    if "ours" in med and "peft" in med:
        out["speedup_ours_vs_peft"] = med["ours"] / med["peft"]  # target >= 1.3 on CPU
        out["peak_rss_ours_minus_peft_mb"] = mem["ours"] - mem["peft"]  # target <= 0
    if "base" in step:
        for v in variants:
            if v != "base":
                out[f"{v}_lora_overhead"] = step[v] / step["base"] - 1  # the limit is 0
        if "peft" in step:
            out["max_speedup_vs_peft"] = step["peft"] / step["base"]  # what a zero-cost LoRA path would reach
    return out


if __name__ == "__main__":  # worker VARIANT OPTIONS_JSON CLOCK THREADS | timing VARIANTS OPTIONS_JSON CLOCK THREADS
    import torch
    mode, what, opts, clock, threads = sys.argv[1:6]
    if int(threads):
        torch.set_num_threads(int(threads))
    if mode == "worker":
        print(json.dumps(worker(what, json.loads(opts), clock)))
    else:
        print(json.dumps(timing_worker(what.split(","), json.loads(opts), clock)))
