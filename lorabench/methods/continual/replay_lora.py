"""Experience replay with a small buffer: one LoRA adapter trained through the sequence, each batch of
a stage mixing the current task's examples with examples kept from every past task (a tiny episodic
memory, Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", arXiv 1902.10486, sec. 3:
the memory is sampled into every mini-batch alongside the current task's examples).

The buffer keeps `buffer_per_task` training examples of each finished task (a seeded random sample of
its training split); a batch of B examples holds round(replay_fraction x B) from the buffer (at least
one once the buffer is not empty) and the rest from the current task.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from torch import nn

from lorabench.config import option
from lorabench.methods.continual.base import SequentialLoRA, Stage, mixed_batches
from lorabench.methods.lora.config import LoraConfig


@dataclass
class ReplayConfig(LoraConfig):
    buffer_per_task: int = option(32, "training examples kept from each finished task (the episodic memory)", low=1)
    replay_fraction: float = option(0.25, "share of each batch drawn from the memory once it holds examples",
                                    low=0.0, high=0.9)


class ReplayLoRA(SequentialLoRA):
    __doc__ = __doc__
    name = "replay-lora"
    title = "Experience replay with a small episodic memory, one LoRA adapter"
    paper = "1902.10486"
    config_cls = ReplayConfig
    mechanism_metrics = {"buffer_examples": "examples in the memory after the last stage (buffer_per_task x tasks)"}

    def __init__(self, config=None):
        super().__init__(config)
        self.buffer: list[tuple[object, dict]] = []

    def stage_batches(self, stage: Stage, tokenizer, batch_size: int, seed: int):
        if not self.buffer:
            return stage.task.train_batches(tokenizer, batch_size, seed)
        k_old = max(1, round(self.config.replay_fraction * batch_size))
        current = [(stage.task, e) for e in stage.task.split().train]
        # one stream over the whole memory: every remembered example is equally likely, whatever its task
        return mixed_batches([(current, max(1, batch_size - k_old)), (self.buffer, k_old)], tokenizer, seed)

    def on_train_end(self, state) -> None:
        state.metrics["buffer_examples"] = len(self.buffer)  # a single-task trial: an empty memory, LoRA

    def end_task(self, model: nn.Module, stage: Stage) -> dict:
        train = stage.task.split().train
        rng = random.Random(stage.seed * 1009 + stage.t)
        keep = rng.sample(range(len(train)), min(self.config.buffer_per_task, len(train)))
        self.buffer += [(stage.task, train[i]) for i in sorted(keep)]
        return {"buffer_examples": len(self.buffer)}

