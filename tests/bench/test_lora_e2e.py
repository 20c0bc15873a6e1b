"""The end-to-end LoRA benchmark (lorabench/bench/lora_e2e.py) on a 2-layer Llama of hidden 64:
every variant trains from the same loss, `base` runs the backward through every target linear with
nothing trainable, and summarize() derives the overheads against base. Speed is not asserted."""
from __future__ import annotations

import pytest
import torch

from lorabench.bench import lora_e2e
from lorabench.bench.kernels import Config

TINY = dict(lora_e2e._options(Config(op="lora_e2e")), model="tiny", batch=2, seq_len=8, steps=1, warmup=1)


TINY_LAYERS = lora_e2e.TINY["num_hidden_layers"]


def test_worker_runs_every_variant_from_the_same_loss():
    out = {v: lora_e2e.worker(v, TINY, "cpu") for v in lora_e2e.VARIANTS}
    for v, o in out.items():
        assert o["variant"] == v and o["step_ms"] > 0 and o["tokens_per_s"] > 0
        assert o["first_loss"] == pytest.approx(out["base"]["first_loss"], rel=1e-5)  # B = 0: LoRA starts at the base
    lora_params = sum(16 * (m.in_features + m.out_features) for name, m in lora_e2e._build("base", TINY).named_modules()
                      if name.rsplit(".", 1)[-1] in lora_e2e.TARGETS)  # rank 16: A (16, in), B (out, 16)
    assert {v: o["trainable_params"] for v, o in out.items()} == dict(ours=lora_params, peft=lora_params,
                                                                      ours_ref=lora_params, base=0)


def test_base_backward_reaches_every_target_linear():
    model = lora_e2e._build("base", TINY)
    assert not any(p.requires_grad for p in model.parameters())
    reached = []

    def watch(name):
        def hook(module, args, out):  # registered after the bench's hook: sees the output it returns
            out.register_hook(lambda grad: reached.append(name))
        return hook

    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in lora_e2e.TARGETS:
            m.register_forward_hook(watch(name))
    ids = torch.randint(0, lora_e2e.TINY["vocab_size"], (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(reached) == TINY_LAYERS * len(lora_e2e.TARGETS)  # layer 0's q/k/v/gate/up included


def _row(variant, step_ms, rss, r=0):
    return lora_e2e.Result(variant=variant, round=r, tokens_per_s=1000.0 / step_ms, step_ms=step_ms,
                           peak_rss_mb=rss, first_loss=1.0, trainable_params=0)


def test_summarize_overheads_against_base():
    rows = [_row("ours", 120, 10), _row("peft", 150, 12), _row("base", 100, 9),
            _row("base", 100, 9, 1), _row("peft", 150, 13, 1), _row("ours", 120, 11, 1)]
    s = lora_e2e.summarize(rows)
    assert s["speedup_ours_vs_peft"] == pytest.approx(1.25)
    assert s["ours_lora_overhead"] == pytest.approx(0.2)
    assert s["peft_lora_overhead"] == pytest.approx(0.5)
    assert s["max_speedup_vs_peft"] == pytest.approx(1.5)
    assert s["base_step_ms"] == 100 and s["peak_rss_ours_minus_peft_mb"] == -2
    assert "base_lora_overhead" not in s
    assert "max_speedup_vs_peft" not in lora_e2e.summarize(rows[:2])  # without base: no bound


def test_bench_runs_workers_and_rejects_unknown_variants():
    opts = (("model", "tiny"), ("batch", "1"), ("seq_len", "4"), ("steps", "1"), ("warmup", "0"), ("rounds", "1"))
    rows = lora_e2e.bench(Config(op="lora_e2e", threads=1, options=opts + (("variants", "ours,base"),)), log=lambda s: None)
    assert [r.variant for r in rows] == ["ours", "base"]
    with pytest.raises(ValueError, match="unknown variants"):
        lora_e2e.bench(Config(op="lora_e2e", options=opts + (("variants", "ours,bse"),)))


def test_timing_worker_interleaves_every_variant_in_one_process():
    """Timing runs every variant's steps in one process, the order rotating each round, on the same batches."""
    rows = lora_e2e.timing_worker(["ours", "peft", "base"], dict(TINY, rounds=3, steps=2), "cpu")
    assert [(r["round"], r["variant"]) for r in rows] == [
        (0, "ours"), (0, "peft"), (0, "base"), (1, "peft"), (1, "base"), (1, "ours"), (2, "base"), (2, "ours"),
        (2, "peft")]
    assert all(len(r["step_ms_each"]) == 2 and r["step_ms"] == pytest.approx(sum(r["step_ms_each"]) / 2) for r in rows)
    assert max(r["first_loss"] for r in rows) == pytest.approx(min(r["first_loss"] for r in rows), rel=1e-5)
