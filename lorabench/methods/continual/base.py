"""What a continual-learning LoRA method is: a LoRA method plus the rules of a task sequence.

A continual method trains each stage like any lorabench method (it *is* a `LoRA` subclass: a
single-task trial is a sequence of one task). The sequence scenario (`lorabench/harness/sequence.py`,
docs/continual.md) drives a sequence of tasks t = 0..T-1 on one model through these hooks:

- `begin_task(model, stage)`: before stage t trains (a fresh adapter, InfLoRA's subspace design);
- `stage_batches(stage, tokenizer, batch_size, seed)`: the training batches of stage t (the current
  task's by default; replay mixes in a buffer of past tasks, multi-task every task seen so far);
- `end_task(model, stage)`: after stage t trains (store the adapter, fold it into the base weights);
  returns the stage's mechanism metrics, which go into the record beside the row R[t];
- `scoring(model, j, stage)`: a context in which the model is the one that scores task j after
  stage t (a per-task adapter when the task is known at test time; the same model otherwise).

- `stage_scored(model, stage)`: after every task has been scored for row R[t]; returns more of the stage's
  metrics, ones only the scoring shows (a mixture's routing on each task's eval examples);
- `adapter_norm(model)`: the norm of the newest update after stage t (recorded per stage).

`StageHooks` holds these hooks with their defaults (nothing done); the sequence scenario runs any method that
has them. `SequentialLoRA` is them on a LoRA adapter with nothing overridden: one adapter trained through the
whole sequence, the forgetting reference (GEM's "single" predictor, arXiv 1706.08840, sec. 5). A continual
method on another layer mixes `StageHooks` into its own method class (`moral-cl`: MoRAL's mixture of experts,
lorabench/methods/continual/moral_cl.py).
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
from torch import nn

from lorabench.methods.lora import LoRA, LoraLinear
from lorabench.methods.lora.layer import init_matrix


@dataclass
class Stage:
    """Stage t of a sequence: the tasks in order (task objects with fixed splits), the trial's seed, the
    tokenizer and the training batch size."""
    t: int
    tasks: list
    seed: int
    tokenizer: object = None
    batch_size: int = 8
    lr: float | None = None   # the trial's learning rate (None: the method's default), for training a method runs itself

    @property
    def task(self):
        return self.tasks[self.t]

    @property
    def seen(self) -> list:
        return self.tasks[: self.t + 1]


def collate_mixed(items: list[tuple[object, dict]], tokenizer) -> dict[str, torch.Tensor]:
    """One training batch of examples from several multiple-choice tasks: each (task, example) is encoded
    with its own task's prompt, option text and max length, then all are padded together (the pool's
    tasks share one output space, lorabench/harness/task_pool.py)."""
    from lorabench.tasks.causal import encode_pair, pad_pairs
    pairs = [encode_pair(tokenizer, task.prompt(e), task.option_text(e["choices"][e["label"]]), task.max_length)
             for task, e in items]
    return pad_pairs(pairs, tokenizer.pad_token_id, train=True)


def endless(n: int, rng: random.Random) -> Iterator[int]:
    """Indices 0..n-1 in shuffled epochs, forever."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


class StageHooks:
    """The stage hooks the sequence scenario drives (module docstring), with their defaults: nothing done
    between stages, the current task's batches, the same model scoring every task. Mixed into a method class
    (first, so that its `family` is the continual one)."""

    family = "continual"

    def begin_task(self, model: nn.Module, stage: Stage) -> None:
        """Before stage `stage.t` trains."""

    def stage_batches(self, stage: Stage, tokenizer, batch_size: int, seed: int) -> Iterator[dict]:
        """The batches stage t trains on: the current task's own."""
        return stage.task.train_batches(tokenizer, batch_size, seed)

    def end_task(self, model: nn.Module, stage: Stage) -> dict:
        """After stage t trains; returns the stage's mechanism metrics."""
        return {}

    @contextlib.contextmanager
    def scoring(self, model: nn.Module, j: int, stage: Stage):
        """The model that scores task j after stage t (the same model for every task, unless overridden)."""
        yield model

    def stage_scored(self, model: nn.Module, stage: Stage) -> dict:
        """After every task has been scored for row R[t]; returns more of the stage's mechanism metrics."""
        return {}

    def adapter_norm(self, model: nn.Module) -> float:
        """The norm of the newest update, recorded after every stage."""
        raise NotImplementedError(f"{type(self).__name__} must say what its adapter's norm is")


class SequentialLoRA(StageHooks, LoRA):
    """Sequential LoRA: one adapter trained on each task in turn, the forgetting reference."""

    name = "seq-lora"
    title = "Sequential LoRA: one adapter fine-tuned on each task in turn (the forgetting reference)"
    paper = "1706.08840"  # GEM's "single" predictor trained across all tasks, and its BWT/FWT
    family = "continual"

    # -- helpers for the methods that start a new adapter per task -----------------------------------
    def lora_named(self, model: nn.Module) -> list[tuple[str, LoraLinear]]:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]

    @torch.no_grad()
    def reset_adapter(self, model: nn.Module, seed: int) -> None:
        """A fresh adapter in every layer (A random, B = 0, as LoRA's init), from `seed`."""
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        for _, layer in self.lora_named(model):
            init_matrix(layer.lora_A, self.config.init, layer.rank)
            layer.lora_B.zero_()
        torch.random.set_rng_state(gen_state)

    @torch.no_grad()
    def fold_adapter(self, model: nn.Module) -> None:
        """W0 <- W0 + s B A in every layer: the trained adapter becomes part of the frozen weights, so that
        the model keeps computing W0 x + Σ_s s B_s A_s x over every past task while a new B A trains."""
        for _, layer in self.lora_named(model):
            layer.base.weight += layer.delta_weight().to(layer.base.weight.dtype)

    @torch.no_grad()
    def adapter_norm(self, model: nn.Module) -> float:
        """||ΔW||_F of the current (newest) adapter over every adapted layer together: sqrt(Σ_l ||s B_l A_l||_F^2).
        Recorded after every stage, so that an adapter that collapses to zero under a penalty is visible."""
        total = 0.0
        for _, layer in self.lora_named(model):
            total += float(torch.linalg.matrix_norm(layer.delta_weight().float()) ** 2)
        return total ** 0.5

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{n}.{p}": getattr(m, p).detach().clone() for n, m in self.lora_named(model) for p in ("lora_A", "lora_B")}

    @torch.no_grad()
    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        for n, m in self.lora_named(model):
            m.lora_A.copy_(state[f"{n}.lora_A"])
            m.lora_B.copy_(state[f"{n}.lora_B"])


def mixed_batches(streams: list[tuple[list[tuple[object, dict]], int]], tokenizer, seed: int) -> Iterator[dict]:
    """Endless batches, each made of `k` items of each (items, k) stream, an item being a (task, example)
    pair; every stream is reshuffled each epoch with its own seeded order."""
    its = [endless(len(items), random.Random(seed * 7919 + i)) for i, (items, _) in enumerate(streams)]
    while True:
        batch = [items[next(it)] for (items, k), it in zip(streams, its) for _ in range(k)]
        yield collate_mixed(batch, tokenizer)
