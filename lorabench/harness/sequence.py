"""The sequence scenario: continual learning, one trial = method x order x seed (issue 18; docs/continual.md).

A trial whose spec carries `continual` options runs here instead of `trial.run_trial`'s single task
(docs/architecture.md, "Where things live"; suites/continual.yaml):

- the order's tasks (multiple-choice tasks sharing one output space, lorabench/harness/task_pool.py)
  are trained one after another on one model, `train.steps` steps each, with the one training loop
  (`harness/train.py`); the method takes part through its stage hooks (lorabench/methods/continual/base.py:
  a fresh adapter, replayed examples, a designed subspace, per-task adapters, a mixture's routing per task);
- before any training, every task is scored on the base model (b_j, the zero-shot row that forward
  transfer is measured against); after stage i every task is scored again on its eval part, filling
  row i of the accuracy matrix R (R[i][j] = accuracy on task j after training on tasks 0..i), the
  tasks not trained yet included (`score_unseen`), which forward transfer needs;
- the metrics (exact definitions in docs/continual.md): ACC = mean_j R[T-1][j]; GEM's backward transfer
  BWT = mean_{j<T-1} (R[T-1][j] - R[j][j]); GEM's forward transfer FWT = mean_{j>0} (R[j-1][j] - b_j)
  (Lopez-Paz & Ranzato, arXiv 1706.08840, sec. 2);
- with `validate`, every task's validation part is scored after the last stage: the score a penalty
  weight (O-LoRA's lambda) is chosen on, never the eval part's.

The record has the single-task fields a runner needs (metric, score = ACC, the sequence's split hash)
and a `continual` block with R, b, the per-example outcomes of every entry (for intervals that carry
the evaluation sample's variance), every stage's training and mechanism metrics, and the newest
adapter's norm after every stage; the report's continual section reads it (lorabench/report/continual.py).
"""
from __future__ import annotations

import hashlib
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

from lorabench.config import from_dict, option
from lorabench.errors import UserError


@dataclass
class ContinualConfig:
    score_unseen: bool = option(True, "after every stage also score the tasks not trained yet (R above its "
                                      "diagonal): forward transfer needs R[j-1][j]; false skips them (FWT is then "
                                      "not measured)")
    validate: bool = option(False, "after the last stage also score every task's validation part: the score a "
                                   "penalty weight (O-LoRA's lambda) is chosen on")
    forget: list[list[int]] = option(default_factory=list, help=(
        "continual forgetting (GS-LoRA's protocol, lorabench/harness/forgetting.py): the classes forgotten by each "
        "task, e.g. [[3], [2]]; the order is then one classification task and the method gs-lora; [] = a "
        "sequence of tasks"))
    learn_steps: int = option(200, "with forget: steps that first train the model on every class (the model that "
                                   "will forget: full fine-tuning)", low=1)
    learn_lr: float | None = option(None, "with forget: the learning rate of those steps (None: train.lr)", low=0.0)


# -- the metrics (docs/continual.md) --------------------------------------------------------------

def average_accuracy(R: list[list[float | None]]) -> float:
    """ACC = (1/T) Σ_j R[T-1][j]: the mean accuracy over every task after the last stage."""
    last = R[-1]
    return sum(last) / len(last)


def backward_transfer(R: list[list[float | None]]) -> float | None:
    """GEM's BWT = 1/(T-1) Σ_{j<T-1} (R[T-1][j] - R[j][j]) (arXiv 1706.08840, sec. 2); negative = forgetting.
    None for a sequence of one task."""
    T = len(R)
    if T < 2:
        return None
    return sum(R[-1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def forward_transfer(R: list[list[float | None]], b: list[float]) -> float | None:
    """GEM's FWT = 1/(T-1) Σ_{j>0} (R[j-1][j] - b_j) (arXiv 1706.08840, sec. 2), b_j the base model's
    accuracy on task j before any training; None when the unseen tasks were not scored or T = 1."""
    T = len(R)
    if T < 2 or any(R[j - 1][j] is None for j in range(1, T)):
        return None
    return sum(R[j - 1][j] - b[j] for j in range(1, T)) / (T - 1)


def sequence_split_hash(split_hashes: list[str]) -> str:
    """The hash of a sequence's splits: its tasks' split hashes in order."""
    return hashlib.sha256("\x00".join(split_hashes).encode()).hexdigest()[:16]


def order_tasks(spec) -> list:
    """The task objects of a continual spec's order, each with its suite options: multiple choice, or (with
    continual.forget) one classification task."""
    from lorabench.tasks import get_task
    tasks = []
    forgetting = bool((spec.continual.get("config") or {}).get("forget"))
    for e in spec.continual["tasks"]:
        task = get_task(e["name"]).from_options(e.get("options") or {}, where=f"task {e['name']}")
        if forgetting:  # continual forgetting: one classification task whose classes are forgotten
            if task.head != "seq-cls" or len(spec.continual["tasks"]) != 1:
                raise UserError(f"continual forgetting (continual.forget) runs on one classification task; the "
                                f"order lists {[x['name'] for x in spec.continual['tasks']]}")
            tasks.append(task)
            continue
        if task.kind != "multiple-choice":
            raise UserError(f"task {e['name']}: the sequence scenario trains one model on tasks that share one "
                            f"output space (the likelihood of each option, lorabench/harness/task_pool.py); "
                            f"{e['name']} is a {task.kind} task. Use multiple-choice tasks, e.g. the pool's")
        tasks.append(task)
    return tasks


class StageTask:
    """The task one stage trains on, as the training loop sees it: its batches are the method's
    (`stage_batches`: the current task's, mixed with a replay buffer, or every task seen so far)."""

    def __init__(self, stage, method):
        self.stage, self.method = stage, method
        self.name = f"{stage.task.name} (stage {stage.t + 1}/{len(stage.tasks)})"

    def train_batches(self, tokenizer, batch_size: int, seed: int):
        return self.method.stage_batches(self.stage, tokenizer, batch_size, seed)


def pack(correct: list[int]) -> str:
    """Per-example outcomes as a record keeps them: "1" correct, "0" wrong, in the eval part's order."""
    return "".join(map(str, correct))


def accuracy(ev) -> float:
    """An evaluation's accuracy as a record keeps it (6 decimals)."""
    return round(float(ev.metrics["accuracy"]), 6)


def score_task(task, model, tokenizer, train_cfg, part: str = "eval"):
    """One task scored on `model`: eval mode, the trial's precision and eval batch size; returns its EvalResult."""
    from lorabench.harness.train import precision
    model.eval()
    with precision(train_cfg):
        return task.evaluate(model, tokenizer, train_cfg.eval_batch_size, part=part)


def score_tasks(tasks: list, scoring, tokenizer, train_cfg, part: str = "eval", only=None):
    """The per-task scoring loop of the scenarios that score several tasks on one model (the sequence scenario after
    every stage, protocol (b) after training, harness/mixture.py): yields (j, EvalResult) for each task j (or each j
    in `only`), scored on the model that `scoring(j)` gives, a context manager (the method's view of the model for
    task j: its own adapter swapped in, or its task id set), while that view is still in force (a mixture reads its
    experts' load on the task there)."""
    for j, task in enumerate(tasks):
        if only is not None and j not in only:
            continue
        with scoring(j) as m:
            yield j, score_task(task, m, tokenizer, train_cfg, part)


def run_sequence(spec, progress: bool = True) -> dict:
    """Run one continual trial (method x order x seed); returns the result part of its record."""
    import sys

    import torch

    from lorabench.harness.train import train
    from lorabench.harness.trial import seed_everything, start_trial
    from lorabench.measure.memory import peak_rss_mb
    from lorabench.methods import get_method
    from lorabench.methods.continual.base import Stage, StageHooks

    t_start = time.perf_counter()
    cfg = from_dict(ContinualConfig, spec.continual.get("config") or {}, "continual")
    if cfg.forget:  # GS-LoRA's protocol: one classification task, classes forgotten task after task
        from lorabench.harness.forgetting import run_forgetting
        return run_forgetting(spec, progress=progress)
    tasks = order_tasks(spec)
    method = get_method(spec.method).from_options(spec.method_options, where=f"method {spec.label}")
    if not isinstance(method, StageHooks):
        raise UserError(f"method {spec.method!r} is not a continual method (family 'continual'); the sequence "
                        f"scenario needs its stage hooks (lorabench/methods/continual/base.py)")
    order = spec.continual.get("order", "order")

    def log(msg: str) -> None:
        if progress:
            sys.stderr.write(f"[continual {spec.label} seed {spec.seed}] {msg}\n")
            sys.stderr.flush()

    start = start_trial(spec, method, spec.model or tasks[0].default_model, "causal-lm")
    train_cfg, model, tokenizer = start.train_cfg, start.model, start.tokenizer
    T = len(tasks)

    eval_seconds = 0.0
    t0 = time.perf_counter()
    # B = 0 at init: the base model's accuracy, b_j
    zero = [ev for _, ev in score_tasks(tasks, lambda j: nullcontext(model), tokenizer, train_cfg)]
    eval_seconds += time.perf_counter() - t0
    b = [accuracy(ev) for ev in zero]
    log(f"before training: {', '.join(f'{t.name} {x:.3f}' for t, x in zip(tasks, b))}")
    R: list[list[float | None]] = [[None] * T for _ in range(T)]
    outcomes: list[list[str | None]] = [[None] * T for _ in range(T)]
    stages, losses, rates, train_seconds = [], [], [], 0.0
    for t in range(T):
        stage = Stage(t=t, tasks=tasks, seed=spec.seed, tokenizer=tokenizer, batch_size=train_cfg.batch_size,
                      lr=train_cfg.lr)
        stage_seed = spec.seed * 1000 + t  # each stage its own batches, the same in every run
        seed_everything(stage_seed)
        method.begin_task(model, stage)
        result = train(model, method, StageTask(stage, method), tokenizer, train_cfg, stage_seed, progress=progress)
        train_seconds += result.train_seconds
        norm = method.adapter_norm(model)  # the newest adapter, before end_task folds or stores it
        stage_metrics = {**result.method_metrics, **method.end_task(model, stage)}
        t0 = time.perf_counter()
        seen = range(T if cfg.score_unseen else t + 1)
        for j, ev in score_tasks(tasks, lambda j, st=stage: method.scoring(model, j, st), tokenizer, train_cfg, only=seen):
            R[t][j] = accuracy(ev)
            outcomes[t][j] = pack(ev.outcomes.correct)
        stage_metrics.update(method.stage_scored(model, stage))  # what only the scoring shows (a mixture's routing)
        eval_seconds += time.perf_counter() - t0
        losses += result.loss_curve
        if result.train_tokens_per_s is not None:
            rates.append(result.train_tokens_per_s)
        stages.append({"stage": t, "task": tasks[t].name, "steps": result.steps,
                       "final_loss": None if result.final_loss is None else round(result.final_loss, 6),
                       "train_seconds": round(result.train_seconds, 3), "adapter_norm": round(norm, 6),
                       "method_metrics": stage_metrics})
        log(f"stage {t + 1}/{T} ({tasks[t].name}): loss {result.final_loss}, adapter norm {norm:.4f}; R[{t}] = "
            + ", ".join("-" if x is None else f"{x:.3f}" for x in R[t]))
    val = None
    if cfg.validate:
        last = Stage(t=T - 1, tasks=tasks, seed=spec.seed, tokenizer=tokenizer, batch_size=train_cfg.batch_size)
        val = [accuracy(ev) for _, ev in score_tasks(tasks, lambda j: method.scoring(model, j, last), tokenizer,
                                                      train_cfg, part="val")]
    acc, bwt, fwt = average_accuracy(R), backward_transfer(R), forward_transfer(R, b)
    splits = [task.split() for task in tasks]
    import statistics
    return {
        "metric": "accuracy",
        "higher_is_better": True,
        "score": round(acc, 6),
        "metrics": {"accuracy": round(acc, 6), "bwt": None if bwt is None else round(bwt, 6),
                    "fwt": None if fwt is None else round(fwt, 6)},
        "split_hash": sequence_split_hash([s.hash for s in splits]),
        "n_train": sum(len(s.train) for s in splits),
        "n_val": sum(len(s.val) for s in splits),
        "n_eval": sum(len(s.eval) for s in splits),
        "outcomes": None,
        "majority_label": None,
        "val_score": None if val is None else round(sum(val) / len(val), 6),
        "val_curve": [],
        "trained_steps": sum(s["steps"] for s in stages),
        **start.record_fields(method),
        "final_loss": stages[-1]["final_loss"],
        "loss_curve": losses,
        "train_tokens_per_s": round(statistics.median(rates), 1) if rates else None,
        "eval_tokens_per_s": None,
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "method_metrics": stages[-1]["method_metrics"],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "trial_seconds": round(time.perf_counter() - t_start, 3),
        "threads": torch.get_num_threads(),
        "continual": {
            "order": order,
            "tasks": [task.name for task in tasks],
            "config": asdict(cfg),
            "split_hashes": [s.hash for s in splits],
            "eval_hashes": [s.part_hash("eval") for s in splits],
            "n_eval": [len(s.eval) for s in splits],
            "zero_shot": b,
            "zero_shot_outcomes": [pack(ev.outcomes.correct) for ev in zero],
            "R": R,
            "outcomes": outcomes,  # outcomes[i][j]: task j's eval examples after stage i, "1" = correct
            "acc": round(acc, 6),
            "bwt": None if bwt is None else round(bwt, 6),
            "fwt": None if fwt is None else round(fwt, 6),
            "val": val,
            "val_acc": None if val is None else round(sum(val) / len(val), 6),
            "stages": stages,
            "adapter_norms": [s["adapter_norm"] for s in stages],
        },
    }
