"""bf16 autocast on a CPU without AVX-512 BF16 or AMX-BF16 is emulated (7-11x slower than fp32): the runner says so
before it starts such trials (lorabench/runner/run.py, emulated_bf16_warning), and only then."""
import pytest

from lorabench.measure import provenance
from lorabench.runner import run
from lorabench.runner.suite import load_suite


@pytest.fixture
def precision_trials():
    return load_suite("precision").trials([])


def test_the_precision_suite_pairs_fp32_and_bf16_trials(precision_trials):
    by_label = {}
    for t in precision_trials:
        by_label.setdefault(t.label, []).append(t)
    assert sorted(by_label) == ["lora", "lora-bf16"]
    assert all(t.train.get("autocast", "off") == "off" for t in by_label["lora"])
    assert all(t.train["autocast"] == "bf16" for t in by_label["lora-bf16"])
    # the pairs differ in the precision alone: same task, seed, learning rate and budget
    strip = lambda t: (t.task, t.seed, {k: v for k, v in t.train.items() if k != "autocast"})
    assert sorted(map(repr, map(strip, by_label["lora"]))) == sorted(map(repr, map(strip, by_label["lora-bf16"])))


@pytest.mark.parametrize("flags, native", [({"AVX2": True, "AVX-512 BF16": False, "AMX-BF16": False}, False),
                                           ({"AVX2": True, "AVX-512 BF16": True, "AMX-BF16": False}, True),
                                           ({"AVX2": True, "AVX-512 BF16": False, "AMX-BF16": True}, True),
                                           ({}, False)])
def test_native_bf16_reads_the_cpu_flags(monkeypatch, flags, native):
    monkeypatch.setattr(provenance, "cpu_features", lambda: flags)
    assert provenance.native_bf16() is native


def test_the_warning_names_the_bf16_trials_only_on_an_emulating_cpu(monkeypatch, precision_trials):
    monkeypatch.setattr(run, "native_bf16", lambda: False)
    n_bf16 = sum(t.label == "lora-bf16" for t in precision_trials)
    assert n_bf16 == 9
    message = run.emulated_bf16_warning(precision_trials)
    assert message.startswith(f"warning: {n_bf16} trial(s)") and "emulated" in message and "AMX-BF16" in message
    assert run.emulated_bf16_warning([t for t in precision_trials if t.label == "lora"]) is None
    monkeypatch.setattr(run, "native_bf16", lambda: True)
    assert run.emulated_bf16_warning(precision_trials) is None
