"""The cross-task pool (issue 17; docs/tasks.md, "The cross-task pool"): the tasks that the multi-task
scenario (an adapter library, its composition, mixtures of LoRA experts) trains and composes adapters on.

All are multiple-choice tasks on one model, SmolLM2-135M, scored the same way: each option's
log-likelihood as the continuation ` {option}` after `Question: {question}\\nAnswer:`
(`lorabench.tasks.multiple_choice.MultipleChoiceTask`), accuracy the metric. One output space, so an
adapter trained on one task can be evaluated, averaged or mixed on any other. Each task keeps its
own fixed, hashed split (`lorabench/tasks/base.py`).
"""
from __future__ import annotations

MODEL = "smollm2-135m"

# the two multiple-choice tasks the benchmark had, then the pool's own (lorabench/tasks/__init__.py)
POOL: tuple[str, ...] = (
    "quartz", "socialiqa",
    "rt-mc", "imdb-mc", "sarcasm-mc",
    "corr2cause", "pararule-plus", "crepe", "abstract-causal",
    "logiqa", "reclor", "parable-moral", "tomi",
)
