"""Export a trained lorabench adapter to the PEFT adapter format.

`export_peft(method, model, directory)` writes `adapter_config.json` + `adapter_model.safetensors`
as `peft.PeftModel.from_pretrained(base_model, directory)` (peft 0.21) and the serving engines that
read that format expect. Tensor names are `base_model.model.<module path>.<peft tensor name>`;
trained task heads (e.g. `classifier`) go in as `modules_to_save`.

What maps onto which peft method (the update each computes is identical, tested in
tests/methods/test_peft_export.py):

| lorabench | peft | how |
|---|---|---|
| lora, rslora, lora-fa, lora-plus, riemannian | LORA | A, B; lora_alpha = s r (so alpha / r = s) |
| dylora | LORA | the first b = eval_rank ranks, lora_alpha = alpha |
| sora, dora-rank | LORA | the gate folded into A: A' = diag(g) A, zero gates dropped |
| lora-xs | LORA | B' = B R, A |
| qlora | LORA | the adapter, for a base quantized to NF4 at load time (peft + bitsandbytes) |
| dora | LORA with use_dora | A, B and the magnitude vector |
| vera | VERA | the vectors; A, B re-drawn from projection_prng_key |
| fourierft | FOURIERFT | the coefficients; entries re-drawn from random_loc_seed |
| adalora | ADALORA | A, E, B at the initial rank (pruned λ are zeros, so no rank pattern is needed) |

Not exportable (a clear error says why): pissa / milora / loftq (their base weights are not the
pretrained ones; peft converts those only with the initial adapter), qa-lora (peft's QA-LoRA needs
a GPTQ base), vb-lora (not mapped yet), and the methods of other issues.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from lorabench.methods.base import Method

PREFIX = "base_model.model."


def _lora_factors(method: Method, layer) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (r, k), B (d, r), scale) such that the layer's update is scale * B A."""
    name = method.name
    A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), float(layer.scale)
    if name == "dylora":
        b = method.eval_rank()
        return A[:b], B[:, :b], method.config.alpha / b
    if name in ("sora", "dora-rank"):
        g = layer.lora_gate.detach()
        keep = g != 0
        if not keep.any():  # every rank pruned: keep one zero rank so that the file stays valid
            keep[0] = True
        return (g[:, None] * A)[keep], B[:, keep], s
    if name == "lora-xs":
        return A, B @ layer.lora_R.detach(), s
    return A, B, s


LORA_LIKE = {"lora", "rslora", "lora-fa", "lora-plus", "riemannian", "dylora", "sora", "dora-rank", "lora-xs", "qlora",
             "dora"}
NOT_EXPORTABLE = {
    "pissa": "its base weights are the SVD residual, not the pretrained ones",
    "milora": "its base weights are the SVD residual, not the pretrained ones",
    "loftq": "its base is the LoftQ-initialised NF4 weight, not the pretrained one",
    "qa-lora": "peft's QA-LoRA needs a GPTQ-quantized base",
    "vb-lora": "not mapped yet",
}


def exportable(name: str) -> bool:
    return name in LORA_LIKE or name in OTHERS


OTHERS = ("vera", "fourierft", "adalora")


def _head_tensors(method: Method, model: nn.Module, adapted: set[str]) -> tuple[list[str], dict]:
    """Trained tensors outside the adapted layers (the task head) -> modules_to_save.

    Each is named by the module that owns it (`classifier`, `bert.pooler.dense`), never by its
    top-level ancestor: BERT's trained pooler lives under `bert`, and `modules_to_save=["bert"]`
    would ask peft to wrap the whole backbone, which already holds the adapted layers (peft then
    raises NoMatchingPeftModuleError on load)."""
    heads, tensors = set(), {}
    for n, p in method.trainable_parameters(model):
        mod = n.rsplit(".", 1)[0]
        if any(mod == a or mod.startswith(a + ".") for a in adapted):
            continue
        heads.add(mod)
        tensors[PREFIX + n] = p.detach()
    return sorted(heads), tensors


def export_peft(method: Method, model: nn.Module, directory: str, base_model_name_or_path: str | None = None,
                task_type: str | None = None) -> dict:
    """Write `method`'s adapter on `model` in the PEFT format into `directory`; returns the adapter config."""
    name = method.name
    if not exportable(name):
        why = NOT_EXPORTABLE.get(name, "no peft counterpart")
        raise ValueError(f"method {name!r} cannot be exported to the PEFT format: {why}. "
                         f"Exportable: {', '.join(sorted(LORA_LIKE | set(OTHERS)))}")
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    cfg: dict = {"base_model_name_or_path": base_model_name_or_path, "task_type": task_type,
                 "inference_mode": True, "revision": None}
    if name in LORA_LIKE:
        from lorabench.methods.lora import LoraLinear
        ranks, alphas = {}, {}
        for path, layer in model.named_modules():
            if not isinstance(layer, LoraLinear):
                continue
            A, B, s = _lora_factors(method, layer)
            targets.append(path)
            tensors[f"{PREFIX}{path}.lora_A.weight"] = A.contiguous()
            tensors[f"{PREFIX}{path}.lora_B.weight"] = B.contiguous()
            if name == "dora":
                tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude.detach().contiguous()
            ranks[path], alphas[path] = A.shape[0], s * A.shape[0]  # peft: scale = lora_alpha / r
        r0, a0 = ranks[targets[0]], alphas[targets[0]]
        cfg.update({"peft_type": "LORA", "r": r0, "lora_alpha": a0, "use_rslora": False,
                    "use_dora": name == "dora", "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                    "init_lora_weights": True,
                    "rank_pattern": {p: r for p, r in ranks.items() if r != r0},
                    "alpha_pattern": {p: a for p, a in alphas.items() if a != a0}})
    elif name == "vera":
        from lorabench.methods.efficiency_freezing_sharing.vera import VeraLinear
        for path, layer in model.named_modules():
            if isinstance(layer, VeraLinear):
                targets.append(path)
                tensors[f"{PREFIX}{path}.vera_lambda_b"] = layer.vera_lambda_b.detach().contiguous()
                tensors[f"{PREFIX}{path}.vera_lambda_d"] = layer.vera_lambda_d.detach().contiguous()
        c = method.config
        cfg.update({"peft_type": "VERA", "r": c.rank, "projection_prng_key": c.projection_seed,
                    "save_projection": False, "vera_dropout": 0.0, "d_initial": c.d_initial, "bias": "none",
                    "fan_in_fan_out": False, "init_weights": True})
    elif name == "adalora":
        from lorabench.methods.dynamic_rank.adalora import SVDLinear
        for path, layer in model.named_modules():
            if isinstance(layer, SVDLinear):
                targets.append(path)
                for t in ("lora_A", "lora_E", "lora_B"):
                    tensors[f"{PREFIX}{path}.{t}"] = getattr(layer, t).detach().contiguous()
        c = method.config
        cfg.update({"peft_type": "ADALORA", "r": c.init_rank, "init_r": c.init_rank, "target_r": c.target_rank,
                    "lora_alpha": c.alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                    "init_lora_weights": True, "total_step": 1, "rank_pattern": None})
    else:  # fourierft
        from lorabench.methods.efficiency_freezing_sharing.fourierft import FourierLinear
        ns = set()
        for path, layer in model.named_modules():
            if isinstance(layer, FourierLinear):
                targets.append(path)
                ns.add(layer.fourierft_spectrum.numel())
                tensors[f"{PREFIX}{path}.fourierft_spectrum"] = layer.fourierft_spectrum.detach().contiguous()
        if len(ns) != 1:
            raise ValueError("fourierft export needs the same number of coefficients in every layer; "
                             f"got {sorted(ns)} (n_frequency was capped at d*k for a small layer)")
        c = method.config
        cfg.update({"peft_type": "FOURIERFT", "n_frequency": ns.pop(), "scaling": c.scaling,
                    "random_loc_seed": c.entry_seed, "fan_in_fan_out": False, "bias": "none",
                    "init_weights": c.init_zero})
    heads, head_tensors = _head_tensors(method, model, set(targets))
    tensors.update(head_tensors)
    cfg["target_modules"] = sorted(targets)
    cfg["modules_to_save"] = heads or None
    os.makedirs(directory, exist_ok=True)
    from safetensors.torch import save_file
    save_file({k: v.cpu() for k, v in tensors.items()}, os.path.join(directory, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return cfg
