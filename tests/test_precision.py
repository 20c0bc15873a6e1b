"""Low-precision trials (train.autocast). bf16 autocast on a CPU without AVX-512 BF16 or AMX-BF16 is emulated (7-11x
slower than fp32): the runner says so before it starts such trials (lorabench/runner/run.py, emulated_bf16_warning),
and only then. bf16-fp32-attention runs the models' SDPA attention in fp32 (lorabench/harness/train.py, sdpa_in_fp32)."""
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
    assert sorted(by_label) == ["lora", "lora-bf16", "lora-bf16-attn32"]
    assert all(t.train.get("autocast", "off") == "off" for t in by_label["lora"])
    assert all(t.train["autocast"] == "bf16" for t in by_label["lora-bf16"])
    assert all(t.train["autocast"] == "bf16-fp32-attention" for t in by_label["lora-bf16-attn32"])
    # the variants differ in the precision alone: same task, seed, learning rate and budget
    strip = lambda t: (t.task, t.seed, {k: v for k, v in t.train.items() if k != "autocast"})
    for label in ("lora-bf16", "lora-bf16-attn32"):
        assert sorted(map(repr, map(strip, by_label["lora"]))) == sorted(map(repr, map(strip, by_label[label])))


@pytest.mark.parametrize("flags, native", [({"AVX2": True, "AVX-512 BF16": False, "AMX-BF16": False}, False),
                                           ({"AVX2": True, "AVX-512 BF16": True, "AMX-BF16": False}, True),
                                           ({"AVX2": True, "AVX-512 BF16": False, "AMX-BF16": True}, True),
                                           ({}, False)])
def test_native_bf16_reads_the_cpu_flags(monkeypatch, flags, native):
    monkeypatch.setattr(provenance, "cpu_features", lambda: flags)
    assert provenance.native_bf16() is native


def test_the_warning_names_the_bf16_trials_only_on_an_emulating_cpu(monkeypatch, precision_trials):
    monkeypatch.setattr(run, "native_bf16", lambda: False)
    n_bf16 = sum(t.label != "lora" for t in precision_trials)
    assert n_bf16 == 18
    message = run.emulated_bf16_warning(precision_trials)
    assert message.startswith(f"warning: {n_bf16} trial(s)") and "emulated" in message and "AMX-BF16" in message
    assert run.emulated_bf16_warning([t for t in precision_trials if t.label == "lora"]) is None
    assert run.emulated_bf16_warning([t for t in precision_trials if t.label == "lora-bf16-attn32"]).startswith(
        "warning: 9 trial(s)")
    monkeypatch.setattr(run, "native_bf16", lambda: True)
    assert run.emulated_bf16_warning(precision_trials) is None


# --- bf16-fp32-attention: the models' SDPA attention in fp32 under bf16 autocast (train.sdpa_in_fp32) ---------------

@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-bert"])
def test_bf16_fp32_attention_runs_sdpa_in_fp32_and_restores_it(model_name):
    import torch
    from transformers.integrations import sdpa_attention
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from lorabench import assets
    from lorabench.harness.train import TrainConfig, precision
    torch.manual_seed(0)
    loaded = assets.load_model(model_name, "causal-lm" if model_name == "tiny-llama" else "seq-cls",
                               **({} if model_name == "tiny-llama" else {"num_labels": 2}))
    model = loaded.model.eval()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(5, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0                                    # a padded row: the mask reaches the attention
    seen = []
    original = sdpa_attention.torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        # autocast casts inside the dispatcher, after this point: what decides the op's precision is whether it is on
        # (Llama's RoPE hands SDPA an fp32 query even under autocast: its cos / sin are fp32)
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return original(q, k, v, *args, **kwargs)

    outs = {}
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sdpa_attention.torch.nn.functional, "scaled_dot_product_attention", spy)
        for mode in ("off", "bf16", "bf16-fp32-attention"):
            seen.clear()
            with torch.no_grad(), precision(TrainConfig(autocast=mode)):
                if mode == "bf16-fp32-attention":
                    assert getattr(ALL_ATTENTION_FUNCTIONS["sdpa"], "upcasts", False)
                    with precision(TrainConfig(autocast=mode)):   # nested (a trial's evaluation inside its run)
                        pass
                    assert getattr(ALL_ATTENTION_FUNCTIONS["sdpa"], "upcasts", False)
                outs[mode] = model(input_ids=ids, attention_mask=mask).logits.float()
            assert seen, "the model's attention did not go through SDPA"
            if mode == "bf16":
                assert all(on for *_, on in seen), seen            # the op runs under autocast: in bf16
            else:
                assert set(seen) == {(torch.float32,) * 3 + (False,)}, (mode, seen)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before and "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping
    # bf16 GEMMs either way: both low-precision modes differ from fp32, and from each other (the attention)
    assert not torch.equal(outs["bf16"], outs["off"]) and not torch.equal(outs["bf16-fp32-attention"], outs["bf16"])
    scale = outs["off"].abs().max()
    assert (outs["bf16-fp32-attention"] - outs["off"]).abs().max() < 0.05 * scale


def test_the_emulated_bf16_warning_counts_every_low_precision_mode(monkeypatch, precision_trials):
    monkeypatch.setattr(run, "native_bf16", lambda: False)
    assert run.emulated_bf16_warning(precision_trials).startswith(
        f"warning: {sum(t.train.get('autocast', 'off') != 'off' for t in precision_trials)} trial(s)")
