"""Issue 15: what makes a trial cheaper must not change one result.

- LoRA's in-place sum (lorabench/methods/lora/layer.py) against eq. (3) written out of place: the same output,
  input gradient and factor gradients, bit for bit, in training (with dropout) and in evaluation;
- a committed record made by the code before the cuts (tests/data/bit_identity.json: a short real MiniLM-L6
  trial with LoRA dropout and a validation curve) run again: every field but times and memory equal;
- the fork server's preload imports the model classes a trial would otherwise import itself.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lorabench.methods.lora.layer import LoraLinear

DATA = Path(__file__).parent / "data" / "bit_identity.json"
# What a run of the same trial may change: when and how long it ran, how much memory it used.
TIMING = {"trial_seconds", "trial_cpu_seconds", "train_seconds", "eval_seconds", "train_tokens_per_s",
          "eval_tokens_per_s", "peak_rss_mb", "rss_after_load_mb"}


def eq3(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """LoRA's forward as it was written before the in-place sum: base(x) + B A dropout(x) * s."""
    h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
    return layer.base(x) + F.linear(F.linear(h, layer.lora_A), layer.lora_B) * layer.scale


def _layer(dropout: float) -> LoraLinear:
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(96, 160), rank=8, scale=2.0, dropout=dropout)
    layer.base.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)  # a nonzero update, so that the sum matters
    return layer


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_inplace_sum_is_eq3_bit_for_bit_in_training(dropout):
    layer = _layer(dropout).train()
    x = torch.randn(4, 37, 96, requires_grad=True)  # odd sizes: every element a rounding of its own
    grads = []
    for fwd in (layer.forward, lambda t: eq3(layer, t)):
        torch.manual_seed(1)  # the same dropout mask for both
        x.grad = None
        layer.zero_grad(set_to_none=True)
        out = fwd(x)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append((out.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    for got, want, name in zip(grads[0], grads[1], ("output", "x.grad", "lora_A.grad", "lora_B.grad")):
        assert torch.equal(got, want), f"{name} differs from eq. (3): max |diff| {(got - want).abs().max()}"


def test_inplace_sum_is_eq3_bit_for_bit_in_evaluation():
    layer = _layer(0.1).eval()
    x = torch.randn(128, 48, 96)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            assert torch.equal(layer(x), eq3(layer, x))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # train.autocast=bf16
        got, want = layer(x), eq3(layer, x)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)


def test_committed_record_is_reproduced():
    """The record tests/data/bit_identity.json keeps was made before the cuts; the same trial now must give every
    field but times and memory unchanged: losses, the validation curve, the score, every prediction."""
    from lorabench.harness.trial import TrialSpec, run_trial
    from lorabench.measure.provenance import cpu_description

    ref = json.loads(DATA.read_text())
    if (cpu_description(), torch.__version__) != (ref["cpu"], ref["torch"]):
        pytest.skip(f"the record was made on {ref['cpu']} with torch {ref['torch']}; this is {cpu_description()} "
                    f"with torch {torch.__version__}: float results are only bit-identical on the same CPU and torch")
    got = json.loads(json.dumps(run_trial(TrialSpec(**ref["spec"]), progress=False), default=str))
    want = ref["record"]
    assert got["trial_cpu_seconds"] > 0
    differ = sorted(k for k in set(got) | set(want) - TIMING if k not in TIMING and got.get(k) != want.get(k))
    assert not differ, {k: (want.get(k), got.get(k)) for k in differ}
    # lr 2e-2 makes B grow in 6 steps (final loss 9.6): a change of LoRA's rounding shows in the losses (checked:
    # the update computed as (B A) h instead of B (A h) changes final_loss in its 4th digit and the loss curve)
    assert len(want["loss_curve"]) == 3 and len(want["val_curve"]) == 2 and want["outcomes"]["n"] == 96


def test_fork_server_preload_imports_the_model_classes():
    from lorabench.runner import worker
    assert "lorabench.runner.preload" in worker.PRELOAD
    code = ("import sys, lorabench.runner.preload as p; "
            "print(all(m in sys.modules for m in p.MODULES), 'transformers.models.bert.modeling_bert' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr
