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
Each run is its own subprocess (peak RSS is per process), the variants alternate over rounds, and a
step's time is the median over the steps after warm-up; tokens/s = tokens per step / that time.
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
from dataclasses import asdict, dataclass

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
    step_ms: float              # median over the steps after warm-up
    peak_rss_mb: float          # the worker process's peak resident memory (model, optimizer, activations)
    first_loss: float           # B = 0 at step 0: every variant starts from the same loss
    trainable_params: int


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


def worker(variant: str, o: dict, clock: str) -> dict:
    import torch

    model = _build(variant, o)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None  # base: nothing to optimize
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (o["batch"], o["seq_len"]), generator=g)
               for _ in range(o["steps"] + o["warmup"])]
    now = time.thread_time if clock == "cpu" else time.perf_counter
    times, first_loss = [], None
    for i, ids in enumerate(batches):
        t0 = now()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        dt = now() - t0
        first_loss = loss.item() if first_loss is None else first_loss
        if i >= o["warmup"]:
            times.append(dt)
    step = statistics.median(times)
    return dict(variant=variant, tokens_per_s=o["batch"] * o["seq_len"] / step, step_ms=step * 1e3,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, first_loss=first_loss,
                trainable_params=sum(p.numel() for p in params))


def bench(cfg, log=print) -> list[Result]:
    o = _options(cfg)
    variants = o["variants"].split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"lora_e2e: unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    rows = []
    for r in range(o["rounds"]):
        for v in (variants if r % 2 == 0 else variants[::-1]):  # alternate the order every round
            cmd = [sys.executable, "-m", "lorabench.bench.lora_e2e", v, json.dumps(o), cfg.clock,
                   str(cfg.threads or 0)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            if out.returncode != 0:
                raise RuntimeError(f"lora_e2e worker {v} failed:\n{out.stderr[-3000:]}")
            rows.append(Result(round=r, **json.loads(out.stdout.strip().splitlines()[-1])))
            log("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in asdict(rows[-1]).items()))
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


if __name__ == "__main__":  # worker: VARIANT OPTIONS_JSON CLOCK THREADS
    import torch
    if int(sys.argv[4]):
        torch.set_num_threads(int(sys.argv[4]))
    print(json.dumps(worker(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3])))
