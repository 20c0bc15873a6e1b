"""Multi-task LoRA: one adapter trained on every task seen so far at once, the joint-training reference.

Stage t trains on batches that mix all tasks 0..t in equal shares (each task its own shuffled stream),
so the last stage trains on the whole sequence jointly, as the multi-task (MTL) upper bound of the
continual-learning benchmarks does (O-LoRA, arXiv 2310.14152, sec. 4, "MTL"); the earlier rows of R
are the same cumulative joint training on the tasks seen so far. Every stage keeps the same step
budget as every other method: the comparison is at equal compute, with all the data available.
"""
from __future__ import annotations

import random

import torch

from lorabench.methods.continual.base import SequentialLoRA, Stage, collate_mixed, endless


class MultitaskLoRA(SequentialLoRA):
    __doc__ = __doc__
    name = "multitask-lora"
    title = "Multi-task LoRA: one adapter trained jointly on every task seen so far (the joint reference)"
    paper = "2310.14152"  # the MTL reference row of O-LoRA's and InfLoRA's tables

    def stage_batches(self, stage: Stage, tokenizer, batch_size: int, seed: int):
        seen = stage.seen
        if len(seen) == 1:
            return stage.task.train_batches(tokenizer, batch_size, seed)
        return round_robin(seen, tokenizer, batch_size, seed)


def round_robin(tasks: list, tokenizer, batch_size: int, seed: int, task_ids: bool = False):
    """Endless batches whose examples cycle through `tasks` in turn (task i of every len(tasks) examples), each
    task's examples in its own seeded shuffled epochs: equal shares of every task, even when a batch holds
    fewer examples than there are tasks. With `task_ids`, each batch also holds `task_ids` (B,): the index in
    `tasks` of each example's task (for methods that route by task, lorabench/harness/mixture.py)."""
    streams = [(task, task.split().train, endless(len(task.split().train), random.Random(seed * 7919 + i)))
               for i, task in enumerate(tasks)]
    k = 0
    while True:
        items, ids = [], []
        for _ in range(batch_size):
            task, train, it = streams[k % len(streams)]
            items.append((task, train[next(it)]))
            ids.append(k % len(streams))
            k += 1
        batch = collate_mixed(items, tokenizer)
        if task_ids:
            batch["task_ids"] = torch.tensor(ids, dtype=torch.long)
        yield batch
