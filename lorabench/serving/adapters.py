"""LoRA adapters as serving loads them: lorabench's safetensors format and PEFT's format.

lorabench (what `lora`'s `save_adapter` writes): one safetensors file, keys `<module path>.lora_A`
(r, in) and `<module path>.lora_B` (out, r), metadata {"method": "lora", "config": json with "rank",
"alpha", "target_modules"}; scale = alpha / rank (eq. (3) of LoRA, arXiv 2106.09685).
PEFT: a directory with `adapter_model.safetensors` (keys `base_model.model.<path>.lora_A.weight`,
`...lora_B.weight`) and `adapter_config.json` (r, lora_alpha, target_modules, and optionally
rank_pattern / alpha_pattern / use_rslora); scale = alpha / r, or alpha / sqrt(r) with rsLoRA
(arXiv 2312.03732).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraAdapter:
    """One adapter: per target module (path in the base model), A (r, in), B (out, r) and its scale."""
    name: str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    scales: dict[str, float] = field(repr=False)

    def __post_init__(self):
        for path, (A, B) in self.weights.items():
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] < 1:
                raise ValueError(f"adapter {self.name!r}, module {path}: need A (r, in) and B (out, r) with the "
                                 f"same r >= 1, got A {tuple(A.shape)} and B {tuple(B.shape)}")
        if set(self.scales) != set(self.weights):
            raise ValueError(f"adapter {self.name!r}: scales and weights name different modules")

    @property
    def max_rank(self) -> int:
        return max(A.shape[0] for A, _ in self.weights.values())

    def delta(self, path: str) -> torch.Tensor:
        """ΔW = s B A of one module (out, in), in fp32: what merging adds to the base weight."""
        A, B = self.weights[path]
        return self.scales[path] * (B.float() @ A.float())


def random_adapter(name: str, shapes: dict[str, tuple[int, int]], rank: int | dict[str, int], alpha: float,
                   seed: int, std: float = 0.02) -> LoraAdapter:
    """A LoRA adapter with random A and B (B nonzero, unlike at initialisation) for tests and benchmarks.
    shapes: module path -> (in, out); rank: one rank or one per module."""
    g = torch.Generator().manual_seed(seed)
    weights, scales = {}, {}
    for path, (n_in, n_out) in shapes.items():
        r = rank[path] if isinstance(rank, dict) else rank
        weights[path] = (torch.randn(r, n_in, generator=g) * std, torch.randn(n_out, r, generator=g) * std)
        scales[path] = alpha / r
    return LoraAdapter(name, weights, scales)


def save_lorabench_adapter(adapter: LoraAdapter, path: str, alpha: float) -> None:
    """Write in lorabench's format (one rank for all modules, as `lora` saves it)."""
    from safetensors.torch import save_file
    ranks = {A.shape[0] for A, _ in adapter.weights.values()}
    if len(ranks) != 1:
        raise ValueError(f"lorabench's format has one rank per adapter, {adapter.name!r} has {sorted(ranks)}")
    tensors = {}
    for p, (A, B) in adapter.weights.items():
        tensors[f"{p}.lora_A"], tensors[f"{p}.lora_B"] = A.contiguous(), B.contiguous()
    targets = sorted({p.rsplit(".", 1)[-1] for p in adapter.weights})
    config = {"rank": ranks.pop(), "alpha": alpha, "target_modules": targets}
    save_file(tensors, path, metadata={"method": "lora", "config": json.dumps(config)})


def save_peft_adapter(adapter: LoraAdapter, directory: str, alpha: float) -> None:
    """Write in PEFT's format; heterogeneous ranks go to `rank_pattern`, as PEFT writes them."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    tensors, ranks = {}, {}
    for p, (A, B) in adapter.weights.items():
        tensors[f"{_PEFT_PREFIX}{p}.lora_A.weight"] = A.contiguous()
        tensors[f"{_PEFT_PREFIX}{p}.lora_B.weight"] = B.contiguous()
        ranks[p] = A.shape[0]
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank is `r`
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
              "bias": "none", "target_modules": sorted({p.rsplit(".", 1)[-1] for p in adapter.weights}),
              "rank_pattern": {p: k for p, k in ranks.items() if k != r}, "alpha_pattern": {},
              "use_rslora": False, "base_model_name_or_path": None, "inference_mode": True}
    save_file(tensors, os.path.join(directory, PEFT_WEIGHTS))
    with open(os.path.join(directory, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=1)


def load_adapter(path: str, name: str | None = None) -> LoraAdapter:
    """Load a lorabench `.safetensors` adapter file or a PEFT adapter directory."""
    name = name or os.path.basename(os.path.normpath(path)).removesuffix(".safetensors")
    if os.path.isdir(path):
        return _load_peft(path, name)
    if os.path.isfile(path):
        return _load_lorabench(path, name)
    raise FileNotFoundError(f"no adapter at {path}: expected a lorabench .safetensors file or a PEFT directory "
                            f"holding {PEFT_WEIGHTS} and {PEFT_CONFIG}")


def _pair_up(state: dict[str, torch.Tensor], suffix_a: str, suffix_b: str, where: str):
    a = {k[: -len(suffix_a)]: v for k, v in state.items() if k.endswith(suffix_a)}
    b = {k[: -len(suffix_b)]: v for k, v in state.items() if k.endswith(suffix_b)}
    if not a or set(a) != set(b):
        raise ValueError(f"{where}: expected pairs of keys '<module>{suffix_a}' and '<module>{suffix_b}'; "
                         f"unpaired: {sorted(set(a) ^ set(b))[:5]}, keys: {sorted(state)[:4]}")
    unknown = [k for k in state if not (k.endswith(suffix_a) or k.endswith(suffix_b))]
    if unknown:
        raise ValueError(f"{where}: keys that are not LoRA A/B weights: {unknown[:5]} (only plain LoRA is served)")
    return {p: (a[p], b[p]) for p in a}


def _load_lorabench(path: str, name: str) -> LoraAdapter:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("method") != "lora":
        raise ValueError(f"{path}: metadata method is {meta.get('method')!r}; only 'lora' adapters are served "
                         "(merge other methods into the base model)")
    config = json.loads(meta.get("config", "{}"))
    if "rank" not in config or "alpha" not in config:
        raise ValueError(f"{path}: metadata config needs 'rank' and 'alpha', got {sorted(config)}")
    scale = float(config["alpha"]) / int(config["rank"])  # eq. (3) of LoRA: s = alpha / r
    weights = _pair_up(state, ".lora_A", ".lora_B", path)
    return LoraAdapter(name, weights, {p: scale for p in weights})


def _pattern_value(pattern: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module path equal to it or ending in '.key'."""
    for key, value in pattern.items():
        if path == key or path.endswith("." + key):
            return value
    return default


def _load_peft(directory: str, name: str) -> LoraAdapter:
    from safetensors.torch import load_file
    cfg_path, w_path = os.path.join(directory, PEFT_CONFIG), os.path.join(directory, PEFT_WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"PEFT adapter directory {directory} lacks {os.path.basename(p)}")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are served")
    state = {k.removeprefix(_PEFT_PREFIX): v for k, v in load_file(w_path).items()}
    weights = _pair_up(state, ".lora_A.weight", ".lora_B.weight", w_path)
    scales = {}
    for p, (A, _) in weights.items():
        r = A.shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, p, cfg.get("lora_alpha", 8)))
        scales[p] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return LoraAdapter(name, weights, scales)
