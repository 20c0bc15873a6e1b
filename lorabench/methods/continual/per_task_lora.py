"""A new LoRA adapter per task, the task known at test time: the upper reference of the sequence scenario.

Each stage starts a fresh adapter (A random, B = 0) and trains it on its task alone; the adapters of
past tasks are kept, and task j is scored with its own adapter (GEM's "independent" predictor, one
model per task, Lopez-Paz & Ranzato, arXiv 1706.08840, sec. 5). No task ever interferes with another,
so its backward transfer is 0 by construction; it needs the task identity at test time, which the
other methods are not given. A task not yet trained (the forward-transfer entries of R) is scored
with the newest adapter.
"""
from __future__ import annotations

import contextlib

from torch import nn

from lorabench.methods.continual.base import SequentialLoRA, Stage


class PerTaskLoRA(SequentialLoRA):
    __doc__ = __doc__
    name = "per-task-lora"
    title = "A new LoRA per task, the task known at test time (the upper reference)"
    paper = "1706.08840"  # GEM's "independent" predictor: one model per task

    def __init__(self, config=None):
        super().__init__(config)
        self.adapters: dict[int, dict] = {}

    def begin_task(self, model: nn.Module, stage: Stage) -> None:
        if stage.t > 0:
            self.reset_adapter(model, stage.seed * 1000 + stage.t)

    def end_task(self, model: nn.Module, stage: Stage) -> dict:
        self.adapters[stage.t] = self.adapter_state(model)
        return {"adapters_kept": len(self.adapters)}

    @contextlib.contextmanager
    def scoring(self, model: nn.Module, j: int, stage: Stage):
        if j not in self.adapters or j == stage.t:
            yield model
            return
        current = self.adapter_state(model)
        self.load_adapter_state(model, self.adapters[j])
        try:
            yield model
        finally:
            self.load_adapter_state(model, current)
