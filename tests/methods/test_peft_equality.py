"""Our methods against HF peft (0.21) on the same tiny models and the same weights.

For each method peft implements: build the tiny model twice (same seed), apply peft's method to one
and ours to the other, copy peft's adapter tensors into ours (after moving them away from their
identity init), then compare forward logits and merged weights (fp32, atol 1e-5). Where the method
fixes its init from the weights (PiSSA) the inits are compared directly; where peft draws it at
random, its statistics.
"""
from __future__ import annotations

import math

import pytest
import torch

peft = pytest.importorskip("peft")

from lorabench.methods import get_method  # noqa: E402
from tests.methods.tester import batch_for, logits, tiny_model  # noqa: E402

TARGETS = ["query", "value", "q_proj", "v_proj", "down_proj", "output.dense"]
KINDS = ("bert", "llama")


def build(kind, peft_config, method_name, options):
    from peft import get_peft_model
    base_p, _ = tiny_model(kind)
    base_o, ctx = tiny_model(kind)
    torch.manual_seed(0)
    pm = get_peft_model(base_p, peft_config).eval()
    torch.manual_seed(0)
    method = get_method(method_name).from_options(options)
    ours = method.apply(base_o, ctx).eval()
    return pm, ours, method


def peft_tensors(pm, adapter="default"):
    """peft name -> (our module path, our tensor name), for LoRA-shaped adapters."""
    out = {}
    for n, p in pm.named_parameters():
        if f".{adapter}" not in n:
            continue
        path = n.removeprefix("base_model.model.")
        for peft_key, ours in (("lora_A", "lora_A"), ("lora_B", "lora_B"), ("lora_magnitude_vector", "lora_magnitude"),
                               ("vera_lambda_b", "vera_lambda_b"), ("vera_lambda_d", "vera_lambda_d")):
            marker = f".{peft_key}.{adapter}"
            if marker in path:
                out[n] = (path.split(marker)[0], ours, p)
    assert out, "peft created no adapter tensors"
    return out


def copy_peft_into_ours(pm, ours, perturb=True):
    g = torch.Generator().manual_seed(7)
    n_copied = 0
    with torch.no_grad():
        for _, (mod, tname, p) in peft_tensors(pm).items():
            if perturb:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            getattr(ours.get_submodule(mod), tname).copy_(p)
            n_copied += 1
    return n_copied


def base_weights(model, prefix=""):
    """Every base nn.Linear weight by its path in the plain model."""
    out = {}
    for n, p in model.named_parameters():
        n = n.removeprefix(prefix).replace(".base_layer.", ".").replace(".base.", ".")
        if n.endswith(".weight") and p.dim() == 2 and ".lora_" not in n and ".vera_" not in n:
            out[n] = p.detach().clone()
    return out


def assert_same_forward_and_merge(pm, ours, method, kind, atol=1e-5):
    b = batch_for(kind)
    lp, lo = logits(pm, b), logits(ours, b)
    torch.testing.assert_close(lo, lp, atol=atol, rtol=1e-5)
    merged_p = pm.merge_and_unload()
    method.merge(ours)
    wp, wo = base_weights(merged_p), base_weights(ours)
    assert wp.keys() <= wo.keys() or wo.keys() <= wp.keys()
    common = wp.keys() & wo.keys()
    assert len(common) > 4
    for k in common:
        torch.testing.assert_close(wo[k], wp[k], atol=atol, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(logits(ours, b), lp, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,rslora", [("lora", False), ("rslora", True)])
def test_lora_and_rslora_equal_peft(kind, name, rslora):
    from peft import LoraConfig
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=rslora, lora_dropout=0.0)
    pm, ours, method = build(kind, cfg, name, {"rank": 4, "alpha": 8, "target_modules": TARGETS})
    layer = next(m for m in ours.modules() if hasattr(m, "lora_A"))
    assert layer.scale == pytest.approx(8 / (math.sqrt(4) if rslora else 4))
    assert copy_peft_into_ours(pm, ours) > 4
    assert_same_forward_and_merge(pm, ours, method, kind)


def test_lora_init_statistics_match_peft():
    """peft draws A at random (kaiming-uniform a=sqrt(5)), B = 0: same distribution as ours."""
    from peft import LoraConfig
    cfg = LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS)
    pm, ours, _ = build("llama", cfg, "lora", {"rank": 16, "alpha": 16, "target_modules": TARGETS})
    a_p = torch.cat([p.flatten() for n, p in pm.named_parameters() if "lora_A" in n])
    a_o = torch.cat([p.flatten() for n, p in ours.named_parameters() if n.endswith("lora_A")])
    assert a_p.numel() == a_o.numel()
    assert a_p.abs().max() <= 1 / math.sqrt(32) + 1e-6 and a_o.abs().max() <= 1 / math.sqrt(32) + 1e-6
    assert a_o.std().item() == pytest.approx(a_p.std().item(), rel=0.05)
    assert not torch.equal(a_o, torch.zeros_like(a_o))
    assert all(torch.count_nonzero(p) == 0 for n, p in pm.named_parameters() if "lora_B" in n)
    assert all(torch.count_nonzero(p) == 0 for n, p in ours.named_parameters() if n.endswith("lora_B"))


@pytest.mark.parametrize("kind", KINDS)
def test_dora_equals_peft(kind):
    from peft import LoraConfig
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    pm, ours, method = build(kind, cfg, "dora", {"rank": 4, "alpha": 8, "target_modules": TARGETS})
    # The magnitude init m = ||W0||_c is deterministic: equal before any copying.
    mags_p = {n.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0]: p
              for n, p in pm.named_parameters() if "lora_magnitude_vector" in n}
    for mod, m in mags_p.items():
        torch.testing.assert_close(ours.get_submodule(mod).lora_magnitude, m, atol=1e-6, rtol=1e-6)
    copy_peft_into_ours(pm, ours)
    assert_same_forward_and_merge(pm, ours, method, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_pissa_init_and_forward_equal_peft(kind):
    """PiSSA's init is a deterministic SVD: A, B and the residual base weights equal peft's without copying."""
    from peft import LoraConfig
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa")
    pm, ours, method = build(kind, cfg, "pissa", {"rank": 4, "alpha": 8, "target_modules": TARGETS})
    for _, (mod, tname, p) in peft_tensors(pm).items():
        torch.testing.assert_close(getattr(ours.get_submodule(mod), tname), p, atol=1e-5, rtol=1e-4)
    wp, wo = base_weights(pm, "base_model.model."), base_weights(ours)
    for k in wp:
        torch.testing.assert_close(wo[k], wp[k], atol=1e-5, rtol=1e-4)
    copy_peft_into_ours(pm, ours)  # after a (simulated) training step, still equal
    assert_same_forward_and_merge(pm, ours, method, kind)


def test_lora_plus_groups_equal_peft():
    """LoRA+'s optimizer groups: the same learning rate per tensor as peft's create_loraplus_optimizer."""
    from peft import LoraConfig
    from peft.optimizers import create_loraplus_optimizer
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    pm, ours, method = build("llama", cfg, "lora-plus", {"rank": 4, "alpha": 8, "target_modules": TARGETS,
                                                         "lr_ratio": 16})
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    lr_p = {}
    names_p = {id(p): n.removeprefix("base_model.model.").replace(".default.weight", "") for n, p in pm.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            lr_p[names_p[id(p)]] = g["lr"]
    names_o = {id(p): n for n, p in ours.named_parameters()}
    lr_o = {names_o[id(p)]: g["lr"] for g in method.param_groups(ours, 1e-3, 0.0) for p in g["params"]}
    assert lr_o == lr_p
    assert {v for v in lr_o.values()} == {1e-3, 16e-3}


@pytest.mark.parametrize("kind", KINDS)
def test_vera_equals_peft(kind):
    """Same key -> the same shared A, B bit for bit; then equal forward and merged weights."""
    from peft import VeraConfig
    cfg = VeraConfig(r=16, target_modules=TARGETS, projection_prng_key=0, d_initial=0.1)
    pm, ours, method = build(kind, cfg, "vera", {"rank": 16, "target_modules": TARGETS, "d_initial": 0.1})
    from lorabench.methods.efficiency_freezing_sharing.vera import VeraLinear
    for mod, m in pm.named_modules():
        if hasattr(m, "vera_lambda_d") and "default" in getattr(m, "vera_lambda_d", {}):
            o = ours.get_submodule(mod.removeprefix("base_model.model."))
            assert isinstance(o, VeraLinear)
            assert torch.equal(o.vera_A, m.vera_A["default"][:, : o.in_features])
            assert torch.equal(o.vera_B, m.vera_B["default"][: o.out_features])
            assert torch.equal(o.vera_lambda_d, m.vera_lambda_d["default"])
    copy_peft_into_ours(pm, ours)
    assert_same_forward_and_merge(pm, ours, method, kind)


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_base_equals_bitsandbytes_nf4(double_quant):
    """peft's QLoRA runs LoRA over bitsandbytes' Linear4bit: our NF4 base dequantizes to bitsandbytes' weight
    (bit-exact without double quantization; with it bitsandbytes' CPU search picks the farther 8-bit code for a
    few absmax within a hair of a midpoint, see lorabench/ops/nf4.py, so allow a small relative error)."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    import torch.nn as nn

    from lorabench.ops.modules import NF4Linear
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    ours = NF4Linear.from_linear(lin, blocksize=64, double_quant=double_quant).dequantize()
    q, state = bnb_f.quantize_4bit(lin.weight.detach(), blocksize=64, compress_statistics=double_quant,
                                   quant_type="nf4")
    theirs = bnb_f.dequantize_4bit(q, state)
    if double_quant:
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-2)
    else:
        assert torch.equal(ours, theirs)


def adalora_pair(kind, total_step=20):
    from peft import AdaLoraConfig
    cfg = AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, target_modules=TARGETS, tinit=2, tfinal=4, deltaT=3,
                        beta1=0.85, beta2=0.85, orth_reg_weight=0.1, total_step=total_step)
    return build(kind, cfg, "adalora", {"init_rank": 6, "target_rank": 3, "alpha": 8, "target_modules": TARGETS,
                                        "tinit": 2 / total_step, "tfinal": 4 / total_step, "delta_t": 3,
                                        "orth_reg_weight": 0.1})


def copy_adalora(pm, ours, perturb=True):
    g = torch.Generator().manual_seed(3)
    pairs = []
    with torch.no_grad():
        for n, p in pm.named_parameters():
            for key in ("lora_A", "lora_E", "lora_B"):
                marker = f".{key}.default"
                if marker in n:
                    mod = n.removeprefix("base_model.model.").split(marker)[0]
                    if perturb:
                        p.add_(0.1 * torch.randn(p.shape, generator=g))
                    o = getattr(ours.get_submodule(mod), key)
                    o.copy_(p)
                    pairs.append((p, o))
    assert pairs
    return pairs


@pytest.mark.parametrize("kind", KINDS)
def test_adalora_forward_and_merge_equal_peft(kind):
    pm, ours, method = adalora_pair(kind)
    copy_adalora(pm, ours)
    assert_same_forward_and_merge(pm, ours, method, kind)


def test_adalora_budget_allocation_equals_peft():
    """Same weights and gradients at every step -> peft's RankAllocator and our hooks zero the same λ, and the
    orthogonality regulariser equals peft's."""
    from lorabench.methods.base import TrainState
    total = 20
    pm, ours, method = adalora_pair("llama", total)
    pairs = copy_adalora(pm, ours)
    b = batch_for("llama")
    pm.train()
    loss_p = pm(**b).loss
    ours.train()
    state = TrainState(model=ours, optimizer=None, scheduler=None, step=0, total_steps=total)
    reg_o = method.extra_loss(state)
    method.on_train_begin(state)
    g = torch.Generator().manual_seed(11)
    n_masked_steps = 0
    for step in range(total):
        for p, o in pairs:
            grad = torch.randn(p.shape, generator=g)
            p.grad, o.grad = grad.clone(), grad.clone()
        pm.base_model.update_and_allocate(step)
        state.step = step
        method.on_step_end(state)
        for p, o in pairs:
            assert torch.equal(p, o), f"step {step}: peft and ours differ"
        n_masked_steps += int(any(torch.count_nonzero(o) < o.numel() for p, o in pairs))
    assert n_masked_steps > 0, "the allocator never pruned anything"
    # the final allocation keeps exactly the target budget (a λ zeroed earlier stays zero without an optimizer)
    assert sum(int(k.sum()) for k in method.rank_mask.values()) == method.target_bgt
    assert reg_o is not None and torch.isfinite(loss_p)


@pytest.mark.parametrize("kind", KINDS)
def test_fourierft_equals_peft(kind):
    """Same seed -> the same spectral entries; with peft's coefficients copied in, equal forward and merge."""
    from peft import FourierFTConfig
    cfg = FourierFTConfig(n_frequency=64, scaling=10.0, random_loc_seed=777, target_modules=TARGETS)
    pm, ours, method = build(kind, cfg, "fourierft", {"n_frequency": 64, "scaling": 10.0, "entry_seed": 777,
                                                      "target_modules": TARGETS})
    n = 0
    with torch.no_grad():
        for mod, m in pm.named_modules():
            if hasattr(m, "fourierft_spectrum") and "default" in m.fourierft_spectrum:
                o = ours.get_submodule(mod.removeprefix("base_model.model."))
                assert torch.equal(o.indices, m.indices["default"])
                o.fourierft_spectrum.copy_(m.fourierft_spectrum["default"])
                n += 1
    assert n > 4
    assert_same_forward_and_merge(pm, ours, method, kind, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_vb_lora_equals_peft(kind):
    from peft import VBLoRAConfig
    cfg = VBLoRAConfig(r=2, num_vectors=16, vector_length=8, topk=2, target_modules=TARGETS)
    pm, ours, method = build(kind, cfg, "vb-lora", {"rank": 2, "num_vectors": 16, "vector_length": 8, "topk": 2,
                                                    "target_modules": TARGETS})
    n = 0
    with torch.no_grad():
        bank_p = pm.base_model.vblora_vector_bank["default"]
        for mod, m in pm.named_modules():
            if hasattr(m, "vblora_logits_A") and "default" in m.vblora_logits_A:
                o = ours.get_submodule(mod.removeprefix("base_model.model."))
                o.vblora_logits_A.copy_(m.vblora_logits_A["default"])
                o.vblora_logits_B.copy_(m.vblora_logits_B["default"])
                o.bank.copy_(bank_p)
                n += 1
    assert n > 4
    assert_same_forward_and_merge(pm, ours, method, kind)
