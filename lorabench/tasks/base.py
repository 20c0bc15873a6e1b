"""A task = dataset + fixed seeded split + prompt format + metric with direction (docs/architecture.md, "Where things live"; docs/tasks.md).

The split never depends on the trial's seed: every method and seed sees the same train and eval
examples, and a sha256 of the split (`Split.hash`) goes into every record so results from
different splits are never compared by accident.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch

from lorabench.config import from_dict, option

SPLIT_SEED = 1234  # fixed for every task; part of the split hash


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    description: str


@dataclass
class Split:
    train: list[dict]
    eval: list[dict]

    @property
    def hash(self) -> str:
        h = hashlib.sha256()
        for part in (self.train, self.eval):
            h.update(json.dumps(part, sort_keys=True, ensure_ascii=False).encode())
            h.update(b"\x00")
        return h.hexdigest()[:16]


@dataclass
class EvalResult:
    metrics: dict[str, float]   # the task's primary metric first, then others
    n_tokens: int               # tokens processed, for eval tokens/s
    seconds: float


@dataclass
class TaskConfig:
    n_train: int | None = option(None, "use only the first n training examples of the fixed split (None = all)", low=1)
    n_eval: int | None = option(None, "evaluate on the first n eval examples (None = the whole eval split)", low=1)
    max_length: int | None = option(None, "truncate inputs to this many tokens (None = the task's default)", low=8)


def seeded_split(items: list[dict], n_eval: int) -> Split:
    """Drop exact duplicates (first kept), shuffle with the fixed split seed, take the first n_eval
    as eval and the rest as train: no example is both trained on and evaluated."""
    seen: set[str] = set()
    unique = []
    for item in items:
        key = json.dumps(item, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    items = unique
    order = list(range(len(items)))
    random.Random(SPLIT_SEED).shuffle(order)
    return Split(train=[items[i] for i in order[n_eval:]], eval=[items[i] for i in order[:n_eval]])


class Task:
    """Base class; subclasses implement the data, the batches, and the evaluation."""

    name: ClassVar[str]
    kind: ClassVar[str]              # classification | multiple-choice | generation | perplexity
    head: ClassVar[str]              # "seq-cls" or "causal-lm": the model head this task trains
    default_model: ClassVar[str]
    dataset: ClassVar[str]           # asset name
    metric: ClassVar[Metric]
    description: ClassVar[str]
    sizes: ClassVar[str]             # human-readable split sizes for docs/tasks.md
    default_max_length: ClassVar[int] = 128
    num_labels: ClassVar[int | None] = None
    config_cls: ClassVar[type] = TaskConfig

    def __init__(self, config: TaskConfig | None = None):
        self.config = config if config is not None else self.config_cls()
        self._split: Split | None = None

    @classmethod
    def from_options(cls, options: dict | None, where: str = "task") -> "Task":
        return cls(from_dict(cls.config_cls, options or {}, f"{where} ({cls.name})"))

    @property
    def max_length(self) -> int:
        return self.config.max_length or self.default_max_length

    # -- data -----------------------------------------------------------------------------------
    def build_split(self) -> Split:
        raise NotImplementedError

    def split(self) -> Split:
        if self._split is None:
            full = self.build_split()
            train = full.train[: self.config.n_train] if self.config.n_train else full.train
            ev = full.eval[: self.config.n_eval] if self.config.n_eval else full.eval
            self._split = Split(train, ev)
        return self._split

    def collate(self, examples: list[dict], tokenizer) -> dict[str, torch.Tensor]:
        """A training batch: model inputs plus `labels`, so that `model(**batch).loss` is the loss."""
        raise NotImplementedError

    def train_batches(self, tokenizer, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches over shuffled epochs of the train split; the order depends on the trial seed."""
        train = self.split().train
        if not train:
            raise ValueError(f"task {self.name} has an empty train split")
        rng = random.Random(seed)
        while True:
            order = list(range(len(train)))
            rng.shuffle(order)
            for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
                yield self.collate([train[j] for j in order[i:i + batch_size]], tokenizer)

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, tokenizer, batch_size: int) -> EvalResult:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "model": self.default_model, "dataset": self.dataset,
                "metric": self.metric.name, "higher_is_better": self.metric.higher_is_better,
                "sizes": self.sizes, "description": self.description}
