"""The validation curve: scoring the validation split during training changes nothing about the
training run (RNG streams restored), lands in the record, and a curve that cannot exist is refused."""
from __future__ import annotations

import pytest

from lorabench.harness.trial import TrialSpec, run_trial


def _trial(**train) -> dict:
    spec = TrialSpec(suite="t", suite_version=1, label="lora-dropout", method="lora-dropout", task="rt-sentiment",
                     task_options={"n_eval": 24, "n_val": 16, "max_length": 24}, model="tiny-bert", seed=0,
                     train={"steps": 6, "batch_size": 4, "eval_batch_size": 8, "threads": 1} | train)
    return run_trial(spec, progress=False)


def test_validating_during_training_leaves_the_run_unchanged():
    # LoRA-dropout draws random masks every step: a validation that consumed RNG would change the run.
    plain, curved = _trial(), _trial(val_every=2)
    assert plain["val_curve"] == [] and [p[0] for p in curved["val_curve"]] == [2, 4, 6]
    assert curved["final_loss"] == plain["final_loss"] and curved["outcomes"] == plain["outcomes"]
    assert curved["val_score"] == plain["val_score"] and 0 <= plain["val_score"] <= 1
    assert all(0 <= p[1] <= 1 for p in curved["val_curve"])


def test_a_validation_interval_longer_than_training_is_refused():
    with pytest.raises(ValueError, match="val_every=9 is more than train.steps=6"):
        _trial(val_every=9)


def test_bf16_autocast_trains_and_evaluates_in_bfloat16():
    import torch
    from lorabench.harness import train as train_mod

    seen = []
    real = torch.nn.functional.linear

    def spy(x, w, b=None):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real(x, w, b)

    torch.nn.functional.linear = spy
    try:
        r = _trial(autocast="bf16")
    finally:
        torch.nn.functional.linear = real
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert r["train"]["autocast"] == "bf16" and 0 <= r["score"] <= 1 and r["final_loss"] == r["final_loss"]
    assert train_mod.TrainConfig().autocast == "off"
