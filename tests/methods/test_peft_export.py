"""Adapters exported by lorabench.methods.export load with peft.PeftModel.from_pretrained and compute the same outputs."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from lorabench.methods import get_method  # noqa: E402
from lorabench.methods.base import ApplyContext  # noqa: E402
from lorabench.methods.export import export_peft  # noqa: E402
from tests.methods.tester import batch_for, logits, tiny_model  # noqa: E402

TARGETS = ["query", "value", "q_proj", "v_proj", "down_proj"]
CASES = [
    ("lora", {"rank": 4, "alpha": 8}, "bert"),
    ("rslora", {"rank": 4, "alpha": 8}, "llama"),
    ("dora", {"rank": 4, "alpha": 8}, "bert"),
    ("dora", {"rank": 2, "alpha": 4}, "llama"),
    ("lora-fa", {"rank": 4, "alpha": 8}, "llama"),
    ("riemannian", {"rank": 4, "alpha": 8}, "bert"),
    ("dylora", {"rank": 4, "alpha": 8, "eval_rank": 3}, "llama"),
    ("sora", {"rank": 4, "alpha": 8}, "bert"),
    ("dora-rank", {"rank": 4, "target_rank": 2, "alpha": 8}, "llama"),
    ("lora-xs", {"rank": 4, "alpha": 4}, "llama"),
    ("vera", {"rank": 16}, "bert"),
    ("fourierft", {"n_frequency": 64, "scaling": 10.0}, "llama"),
    ("adalora", {"init_rank": 4, "target_rank": 2, "alpha": 8}, "bert"),
]


@pytest.mark.parametrize("name,options,kind", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_export_loads_in_peft_with_equal_outputs(name, options, kind, tmp_path):
    from peft import PeftModel

    from lorabench.harness.trial import head_modules
    base, ctx = tiny_model(kind)
    if kind == "bert":  # the head a real trial trains: the pooler as well as the classifier
        ctx.head_modules = head_modules(base, "seq-cls")
    torch.manual_seed(0)
    method = get_method(name).from_options({**options, "target_modules": TARGETS})
    model = method.apply(base, ctx)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        if name in ("sora", "dora-rank"):  # a pruned rank: exercised by the export's folding of the gate
            next(m for m in model.modules() if hasattr(m, "lora_gate")).lora_gate[1] = 0.0
        if name == "adalora":  # a pruned singular value
            next(m for m in model.modules() if hasattr(m, "lora_E")).lora_E[1] = 0.0
    b = batch_for(kind)
    expected = logits(model, b)
    cfg = export_peft(method, model, str(tmp_path))
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    fresh, _ = tiny_model(kind)
    pm = PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    torch.testing.assert_close(logits(pm, b), expected, atol=1e-5, rtol=1e-5)
    if kind == "bert":  # each trained head module by its own name: not "bert", the whole backbone
        assert cfg["modules_to_save"] == ["bert.pooler.dense", "classifier"]


def test_qlora_export_loads_onto_the_dequantized_base(tmp_path):
    """QLoRA's adapter is plain LoRA: on the NF4-dequantized base, peft computes what our QLoRA model computes."""
    from peft import PeftModel

    from lorabench.ops.modules import NF4Linear
    base, ctx = tiny_model("llama")
    torch.manual_seed(0)
    method = get_method("qlora").from_options({"rank": 4, "alpha": 8, "target_modules": TARGETS})
    model = method.apply(base, ctx)
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    b = batch_for("llama")
    expected = logits(model, b)
    export_peft(method, model, str(tmp_path))
    fresh, _ = tiny_model("llama")
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, NF4Linear):
                fresh.get_submodule(n.removesuffix(".base")).weight.copy_(m.dequantize())
    pm = PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    torch.testing.assert_close(logits(pm, b), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["pissa", "qa-lora", "vb-lora"])
def test_unexportable_methods_say_why(name, tmp_path):
    base, ctx = tiny_model("llama")
    method = get_method(name)()
    with pytest.raises(ValueError, match="cannot be exported"):
        export_peft(method, base, str(tmp_path))


# -- the real models: MiniLM-L6 (BERT, with its trained pooler) and SmolLM2-135M (Llama) ----------------

REAL = [("minilm-l6", "seq-cls"), ("smollm2-135m", "causal-lm")]


def _real_options(name: str, options: dict) -> dict:
    """The tiny-model case's options, on every linear layer of the real model (vera: one shared shape)."""
    if name == "vera":
        return {**options, "target_modules": ["query", "value", "q_proj", "o_proj"]}
    return dict(options)


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")  # with the other tests that load it (tests/test_assets.py)
@pytest.mark.parametrize("asset,head", REAL, ids=[a for a, _ in REAL])
def test_export_of_every_exportable_method_loads_in_peft_on_the_real_models(asset, head, tmp_path):
    """The published suites train MiniLM (pooler + classifier heads) and SmolLM2; an export from them
    must load with peft.PeftModel.from_pretrained and compute the same outputs."""
    from peft import PeftModel

    from lorabench import assets
    from lorabench.harness.trial import head_modules
    try:
        loaded = assets.load_model(asset, head=head, num_labels=2 if head == "seq-cls" else None, seed=0)
    except Exception as e:  # noqa: BLE001 - the asset cache is absent on this machine
        pytest.skip(f"{asset} is not available: {e}")
    tok = loaded.tokenizer
    enc = tok(["a quiet film that never finds its pulse", "the river froze, so the ice was thicker"],
              return_tensors="pt", padding=True)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    failures = []
    names = sorted({c[0] for c in CASES})
    for name in names:
        options = next(o for n, o, _ in CASES if n == name)
        model = assets.load_model(asset, head=head, num_labels=2 if head == "seq-cls" else None, seed=0).model
        ctx = ApplyContext(model.config.model_type, head_modules(model, head), 0)
        torch.manual_seed(0)
        method = get_method(name).from_options(_real_options(name, options))
        model = method.apply(model, ctx)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for _, p in method.trainable_parameters(model):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        expected = logits(model, batch)
        out = tmp_path / name
        cfg = export_peft(method, model, str(out))
        if head == "seq-cls":
            assert cfg["modules_to_save"] == ["bert.pooler.dense", "classifier"], cfg["modules_to_save"]
        fresh = assets.load_model(asset, head=head, num_labels=2 if head == "seq-cls" else None, seed=1).model
        try:
            pm = PeftModel.from_pretrained(fresh, str(out)).eval()
            torch.testing.assert_close(logits(pm, batch), expected, atol=2e-4, rtol=2e-4)
        except Exception as e:  # noqa: BLE001 - collect every method's failure, then fail once
            failures.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
    assert not failures, "\n".join(failures)
