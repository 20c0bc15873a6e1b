"""A task = dataset + fixed seeded split + prompt format + metric with direction (docs/architecture.md, "Where things live"; docs/tasks.md).

The split never depends on the trial's seed: every method and seed sees the same train, validation
and eval examples, and a sha256 of the split (`Split.hash`) goes into every record so results from
different splits are never compared by accident. Three parts, disjoint:

- `train`: what the model is trained on;
- `val`: carved from the training data (never from eval), for model selection (learning rates,
  budgets from validation curves); a task without one has `val = []`;
- `eval`: the held-out test split every published score is computed on, whole by default.

`evaluate(..., part=)` scores either held-out part and returns the per-example outcomes
(`Outcomes`: prediction, label, correct) in the part's order, so a report can pair two methods
example by example (`Split.part_hash` ties the outcomes to the examples they were scored on).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch

from lorabench.config import from_dict, option

SPLIT_SEED = 1234  # fixed for every task; part of the split hash


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    description: str


PARTS = ("eval", "val")  # the held-out parts a task can be scored on


def _digest(*parts: list[dict]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


@dataclass
class Split:
    train: list[dict]
    eval: list[dict]
    val: list[dict] = field(default_factory=list)

    @property
    def hash(self) -> str:
        # A task without a validation part keeps the hash it had before parts were three.
        return _digest(self.train, self.eval, self.val) if self.val else _digest(self.train, self.eval)

    def part_hash(self, part: str) -> str:
        """The hash of one held-out part alone: per-example outcomes are only compared on equal hashes."""
        return _digest(self.part(part))

    def part(self, part: str) -> list[dict]:
        if part not in PARTS:
            raise ValueError(f"unknown split part {part!r}; valid: {', '.join(PARTS)}")
        return self.eval if part == "eval" else self.val


@dataclass
class Outcomes:
    """Per-example results in the order of the split part they were scored on.

    `correct` is 1/0 per example; `pred` and `label` are class or option indices where the task has
    them (classification, multiple choice), None otherwise (exact match: the answer is free text).
    """
    correct: list[int]
    pred: list[int] | None = None
    label: list[int] | None = None

    def __post_init__(self):
        for name in ("pred", "label"):
            v = getattr(self, name)
            if v is not None and len(v) != len(self.correct):
                raise ValueError(f"outcomes: {name} has {len(v)} entries for {len(self.correct)} examples")

    @property
    def one_class(self) -> bool:
        """Every example (more than one) got the same predicted class: a single-class predictor."""
        return self.pred is not None and len(self.pred) > 1 and len(set(self.pred)) == 1

    def to_record(self, part_hash: str) -> dict:
        """Compact JSON: each list as a string of digits when every value is 0..9 (2-5 classes here)."""
        def pack(xs):
            if xs is None:
                return None
            return "".join(map(str, xs)) if all(0 <= x <= 9 for x in xs) else list(xs)
        return {"hash": part_hash, "n": len(self.correct), "correct": pack(self.correct),
                "pred": pack(self.pred), "label": pack(self.label)}

    @staticmethod
    def from_record(d: dict) -> "Outcomes":
        def unpack(v):
            if v is None:
                return None
            return [int(c) for c in v] if isinstance(v, str) else [int(x) for x in v]
        return Outcomes(correct=unpack(d["correct"]), pred=unpack(d.get("pred")), label=unpack(d.get("label")))


@dataclass
class EvalResult:
    metrics: dict[str, float]   # the task's primary metric first, then others
    n_tokens: int               # tokens processed, for eval tokens/s
    seconds: float
    outcomes: Outcomes | None = None  # per example, in the scored part's order (None: a perplexity task)
    option_scores: list[list[float]] | None = None  # multiple choice: each option's log-likelihood, per example


@dataclass
class TaskConfig:
    n_train: int | None = option(None, "use only the first n training examples of the fixed split (None = all)", low=1)
    n_eval: int | None = option(None, "evaluate on the first n eval examples (None = the whole eval split)", low=1)
    n_val: int | None = option(None, "validate on the first n validation examples (None = the whole validation "
                               "split)", low=1)
    max_length: int | None = option(None, "truncate inputs to this many tokens (None = the task's default)", low=8)
    group_by_length: bool = option(False, "training batches of similar lengths (as transformers' group_by_length): "
                                   "less padding, same examples per epoch")


def seeded_split(items: list[dict], n_eval: int, n_val: int = 0) -> Split:
    """Drop exact duplicates (first kept), shuffle with the fixed split seed, take the first n_eval
    as eval, the next n_val as validation and the rest as train: no example is in two parts.
    The eval part does not depend on n_val, so adding a validation part leaves every test example
    where it was."""
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
    return Split(train=[items[i] for i in order[n_eval + n_val:]], eval=[items[i] for i in order[:n_eval]],
                 val=[items[i] for i in order[n_eval:n_eval + n_val]])


GROUP_MEGABATCH = 50  # batches per length-sorted group (transformers' LengthGroupedSampler uses 50)


def group_by_length(order: list[int], lengths: list[int], batch_size: int, n_batches: int,
                    rng: random.Random) -> list[list[int]]:
    """Length-grouped batches over one shuffled epoch, as transformers' `LengthGroupedSampler`: the
    shuffled order is cut into groups of GROUP_MEGABATCH batches, each group sorted by length and cut
    into batches; the batches are then shuffled, so lengths carry no order through the epoch. Every
    batch holds examples of similar length (less padding); the epoch's examples are the same as
    without grouping (those of its first n_batches * batch_size positions)."""
    used = order[:n_batches * batch_size] if len(order) >= batch_size else order
    mega = GROUP_MEGABATCH * batch_size
    batches = []
    for g in range(0, len(used), mega):
        group = sorted(used[g:g + mega], key=lambda j: lengths[j], reverse=True)
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def seeded_group_split(items: list[dict], group_of, n_eval_groups: int, n_val_groups: int = 0) -> Split:
    """`seeded_split` for items that come in groups (several questions about one story): exact
    duplicates dropped, then whole groups (`group_of(item)`, in order of first appearance) shuffled
    with the fixed split seed; the first n_eval_groups are eval, the next n_val_groups validation, the
    rest train. No group is in two parts, so no story is both trained on and evaluated."""
    seen: set[str] = set()
    groups: dict[str, list[dict]] = {}
    for item in items:
        key = json.dumps(item, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            groups.setdefault(group_of(item), []).append(item)
    order = list(groups)
    random.Random(SPLIT_SEED).shuffle(order)
    part = lambda keys: [item for k in keys for item in groups[k]]  # noqa: E731
    return Split(train=part(order[n_eval_groups + n_val_groups:]), eval=part(order[:n_eval_groups]),
                 val=part(order[n_eval_groups:n_eval_groups + n_val_groups]))


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
    val_size: ClassVar[int] = 0      # validation examples carved from the training data (0 = none)
    partition_tags: ClassVar[tuple[str, ...]] = ()  # example keys a natural federated partition splits by
    # ("domain", "role": lorabench/harness/partitions.py)
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
            val = full.val[: self.config.n_val] if self.config.n_val else full.val
            self._split = Split(train, ev, val)
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
        lengths = self.example_lengths(train, tokenizer) if self.config.group_by_length else None
        while True:
            order = list(range(len(train)))
            rng.shuffle(order)
            starts = range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size)
            batches = [order[i:i + batch_size] for i in starts]
            if lengths is not None:
                batches = group_by_length(order, lengths, batch_size, len(batches), rng)
            for b in batches:
                yield self.collate([train[j] for j in b], tokenizer)

    @staticmethod
    def example_lengths(examples: list[dict], tokenizer) -> list[int]:
        """Each example's length in tokens (for group_by_length): its text fields joined and tokenized
        (a multiple-choice example counts every option: a proxy, the ordering is what matters)."""
        def text(e: dict) -> str:
            return " ".join(v if isinstance(v, str) else " ".join(x for x in v if isinstance(x, str))
                            for v in e.values() if isinstance(v, (str, list)))
        return [len(ids) for ids in tokenizer([text(e) for e in examples])["input_ids"]]

    # -- evaluation -----------------------------------------------------------------------------
    def examples(self, part: str) -> list[dict]:
        """The examples of a held-out part; a clear error for a task without a validation part."""
        examples = self.split().part(part)
        if not examples:
            raise ValueError(f"task {self.name} has no {part} examples"
                             + (" (it has no validation split; validation needs a task with val_size > 0)"
                                if part == "val" else ""))
        return examples

    def majority_label(self) -> int | None:
        """The most frequent training label (ties: the smallest), the majority-class baseline's prediction;
        None for tasks without labels."""
        labels = [e["label"] for e in self.split().train if isinstance(e.get("label"), int)]
        if not labels:
            return None
        counts = {k: labels.count(k) for k in set(labels)}
        return min(counts, key=lambda k: (-counts[k], k))

    @torch.no_grad()
    def evaluate(self, model, tokenizer, batch_size: int, part: str = "eval") -> EvalResult:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "model": self.default_model, "dataset": self.dataset,
                "metric": self.metric.name, "higher_is_better": self.metric.higher_is_better,
                "sizes": self.sizes, "description": self.description}
