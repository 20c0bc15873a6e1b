"""The one Method API every lorabench method implements (docs/architecture.md, "Where things live").

A method is a config dataclass (every field with help text and validation, see
`lorabench.config.option`) plus a `Method` subclass that:

- applies itself to a model's target modules (`apply`), freezing what it does not train;
- names its trainable parameters and optimizer parameter groups (LoRA+ needs its own);
- takes part in training through hooks (`on_train_begin`, `on_step_begin`, `extra_loss`,
  `on_after_backward`, `on_step_end`, `on_train_end`): AdaLoRA's rank allocation, ReLoRA's
  restarts, DyLoRA's rank sampling live there, never as special cases in the training loop;
- merges/unmerges where the math allows, and saves/loads its adapter as safetensors.

Every method names its paper (arXiv id) and the survey family it belongs to (survey arXiv
2407.11046, section names).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lorabench.config import from_dict, option

# The survey's taxonomy (arXiv 2407.11046, sections 3-7), used to group methods in reports.
FAMILIES = {
    "baseline": "Baselines (not LoRA): full fine-tuning and a frozen backbone",
    "lora": "LoRA (the original method)",
    "beyond-fine-tuning": "Low-rank adaptation beyond fine-tuning: long context",
    "low-rank-bottleneck": "Downstream adaptation: breaking the low-rank bottleneck",
    "dynamic-rank": "Downstream adaptation: dynamic rank allocation",
    "learning-procedure": "Downstream adaptation: optimizing the learning procedure",
    "combining": "Downstream adaptation: combining with other learning paradigms",
    "cross-task": "Cross-task generalization",
    "efficiency-pruning": "Efficiency: parameter pruning",
    "efficiency-freezing-sharing": "Efficiency: parameter freezing and sharing",
    "efficiency-quantization": "Efficiency: parameter quantization",
    "efficiency-parallel": "Efficiency: parallel LoRA computing",
    "federated": "LoRA for federated learning",
    "continual": "LoRA for continual learning (beyond fine-tuning; lifelong mixtures)",
    "applications": "Applications of LoRA",
}


@dataclass
class ApplyContext:
    """What a method needs to know about the model it is applied to."""
    architecture: str                 # "bert", "llama", ... (config.model_type)
    head_modules: list[str]           # task-head module names that every method trains (e.g. "classifier")
    seed: int = 0


@dataclass
class TrainState:
    """Passed to every training hook; methods may read everything and write `metrics`."""
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    step: int                          # 0-based index of the current step
    total_steps: int
    loss: torch.Tensor | None = None
    batch: dict | None = None
    metrics: dict = field(default_factory=dict)  # method-specific measurements, go into the record


@dataclass
class MethodConfig:
    """Options common to every adapter method."""
    target_modules: list[str] | None = option(
        None, "names (or name suffixes) of the modules to adapt; None = every linear layer of the "
              "transformer blocks (QLoRA's 'all linear' recommendation), never the task head")


def resolve_targets(model: nn.Module, targets: list[str] | None, ctx: ApplyContext,
                    types: tuple[type, ...] = (nn.Linear,)) -> list[str]:
    """Names of the modules to adapt. A name matches a target if it equals it or ends with '.target'."""
    excluded = set(ctx.head_modules) | {"lm_head"}

    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in excluded)

    names = []
    for name, module in model.named_modules():
        if not isinstance(module, types) or in_head(name):
            continue
        if targets is None or any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, types) and not in_head(n)]
        suffixes = sorted({n.split(".")[-1] for n in linear})
        raise ValueError(f"target_modules={targets} matches no module of this {ctx.architecture} model; "
                         f"its linear layers end in: {', '.join(suffixes)}")
    return names


def interval_in_budget(every: int | None, fraction: float, window: int, what: str) -> int:
    """The period, in steps, of a periodic mechanism (a restart, a merge, a reallocation) that must
    fire within `window` training steps: `every` when the config gives it, else `fraction` of the
    window (at least 1 step), so the schedule scales with the trial's budget. A given `every` that
    could not fire even once in the window is rejected rather than silently turning the method
    into plain LoRA."""
    if window < 1:
        raise ValueError(f"{what}: this budget leaves no step for the mechanism to act in; train more steps")
    if every is None:
        return max(1, int(round(fraction * window)))
    if every > window:
        raise ValueError(f"{what}={every} never fires within the {window} steps this budget leaves for it; "
                         f"set {what} to at most {window}, or leave it None to use {fraction:g} of the steps")
    return every


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where `name` was, in the same train/eval mode as the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new.train(getattr(parent, child).training)
    setattr(parent, child, new)


class DeltaLayer(nn.Module):
    """A layer whose update is an additive ΔW on `self.base.weight`, given by `delta_weight()`:
    merging adds it to the frozen weight and unmerging subtracts it (exact up to rounding)."""

    merged: bool = False

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


class Method:
    """Base class. Subclasses set the class attributes and override what they need."""

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str]            # arXiv id, e.g. "2106.09685"; "" for baselines
    family: ClassVar[str]           # a key of FAMILIES
    config_cls: ClassVar[type] = MethodConfig
    default_lr: ClassVar[float] = 1e-3   # the paper's / common recommendation; a suite can override
    mergeable: ClassVar[bool] = False
    # The quantities that show the method's defining mechanism acting in a run (ReLoRA's restarts,
    # SoRA's ranks, ...): name -> one-line meaning. `on_train_end` writes every one of them into
    # TrainState.metrics (-> the record's `method_metrics`); docs/methods.md lists them and
    # tests/methods/test_behaviour.py checks that each is recorded and that the mechanism fires.
    # Empty for LoRA and for the variants whose difference is static (init, scaling, forward).
    mechanism_metrics: ClassVar[dict[str, str]] = {}
    # True where the method reads the training forward's logits at positions without a target (a hook on the
    # model's output, a second pass compared position by position): the training loop then computes the output
    # layer everywhere. False lets it skip the positions no loss reads (lorabench/harness/train.py,
    # target_rows_head); tests/test_train_target_rows.py checks every registered method's training either way.
    logits_everywhere_in_training: ClassVar[bool] = False

    def __init__(self, config=None):
        self.config = config if config is not None else self.config_cls()

    @classmethod
    def from_options(cls, options: dict | None, where: str = "method") -> "Method":
        return cls(from_dict(cls.config_cls, options or {}, f"{where} ({cls.name})"))

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    # -- applying -----------------------------------------------------------------------------
    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        """Freeze the backbone, add the method's parameters, keep the task head trainable."""
        raise NotImplementedError

    @staticmethod
    def freeze_all_but_head(model: nn.Module, ctx: ApplyContext) -> None:
        for n, p in model.named_parameters():
            p.requires_grad_(any(n.startswith(h + ".") for h in ctx.head_modules))

    # -- training -----------------------------------------------------------------------------
    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        params = [p for _, p in self.trainable_parameters(model)]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}] if params else []

    def train_batches(self, state: TrainState, task, tokenizer, batch_size: int, seed: int):
        """The training batches: the task's own; a method that chooses the examples it trains on
        (STAR's active learning over an unlabelled pool) overrides this."""
        return task.train_batches(tokenizer, batch_size, seed)

    def on_train_begin(self, state: TrainState) -> None: ...
    def on_step_begin(self, state: TrainState) -> None: ...
    def extra_loss(self, state: TrainState) -> torch.Tensor | None: return None  # regularisers
    def on_after_backward(self, state: TrainState) -> None: ...   # gradient transforms
    def on_step_end(self, state: TrainState) -> None: ...         # after optimizer.step()
    def on_train_end(self, state: TrainState) -> None: ...

    # -- merge --------------------------------------------------------------------------------
    layer_type: ClassVar[type | None] = None  # the layer class `apply` inserts, when it has merge()/unmerge()

    def layers(self, model: nn.Module) -> list[nn.Module]:
        if self.layer_type is None:
            raise NotImplementedError(f"method {self.name!r} does not name its layer type")
        return [m for m in model.modules() if isinstance(m, self.layer_type)]

    def merge(self, model: nn.Module) -> None:
        if self.layer_type is None:
            raise NotImplementedError(f"method {self.name!r} cannot be merged into the base weights")
        for m in self.layers(model):
            m.merge()

    def unmerge(self, model: nn.Module) -> None:
        if self.layer_type is None:
            raise NotImplementedError(f"method {self.name!r} cannot be merged into the base weights")
        for m in self.layers(model):
            m.unmerge()

    # -- saving -------------------------------------------------------------------------------
    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild the adapted model from the base model (default: trained tensors)."""
        return {n: p.detach() for n, p in self.trainable_parameters(model)}

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        own = dict(model.named_parameters())
        own.update(dict(model.named_buffers()))
        missing = [k for k in self.adapter_state_dict(model) if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise ValueError(f"adapter does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)

    def save_adapter(self, model: nn.Module, path: str) -> int:
        """Write the adapter as safetensors; returns its size in bytes."""
        import os

        from safetensors.torch import save_file
        tensors = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict(model).items()}
        save_file(tensors, path, metadata={"method": self.name, "config": json.dumps(self.config_dict())})
        return os.path.getsize(path)


def load_adapter(model: nn.Module, path: str, ctx: ApplyContext) -> tuple[nn.Module, Method]:
    """Rebuild a method from a saved adapter's metadata, apply it to `model`, load its tensors."""
    from safetensors import safe_open

    from lorabench.methods import get_method
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "method" not in meta:
        raise ValueError(f"{path} is not a lorabench adapter (no 'method' in its metadata)")
    method = get_method(meta["method"]).from_options(json.loads(meta.get("config", "{}")), where=path)
    model = method.apply(model, ctx)
    method.load_adapter_state_dict(model, state)
    return model, method
