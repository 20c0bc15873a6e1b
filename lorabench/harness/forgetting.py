"""Continual forgetting: GS-LoRA's protocol (Zhao et al., arXiv 2403.11530; docs/continual.md, "Continual forgetting").

A continual trial whose options set `forget` (a list of class sets, one per forgetting task) runs here instead of
the sequence of tasks (lorabench/harness/sequence.py), on one classification task:

1. the model that will forget: the task's model fully fine-tuned on every class for `learn_steps` steps at
   `learn_lr` (every weight, the method's LoRA groups and the head; the groups then folded into the weights), as
   the paper starts from a fully trained model that knows every class;
2. forgetting task t = 0..T-1: the classes F_t are to be forgotten, the classes not forgotten yet kept;
   the method's `begin_forgetting` (fresh groups, head frozen, a stream of F_t's training examples for its
   forgetting loss), then `train.steps` steps of the one training loop (harness/train.py) on the kept classes'
   training examples (L_retain), then the groups folded in;
3. after the learning and after every task, the eval part is scored per class. Per task t (the paper's measures):
   Acc_f, the accuracy on F_t's eval examples (lower is better), Acc_r on the kept classes' (higher is better),
   Drop_f = Acc_f before the task − Acc_f after, and H-mean = 2 · Drop_f · Acc_r / (Drop_f + Acc_r) (the
   harmonic mean of the forgetting and the keeping, as the authors' `evaluate` computes it; 0 when both are 0);
   also the accuracy on the classes forgotten in earlier tasks (they must stay forgotten), and the method's
   group norms and the number of blocks whose group is zero.

The record's score is the last task's H-mean; its `forgetting` block holds every stage.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, replace

from lorabench.errors import UserError


def _subset(task, train: list[dict]):
    """The task with another training part (its eval and validation parts unchanged)."""
    from lorabench.tasks.base import Split
    sub = copy.copy(task)
    full = task.split()
    sub._split = Split(train=train, eval=full.eval, val=full.val)
    return sub


def class_accuracy(outcomes, classes: list[int]) -> float | None:
    """Accuracy over the eval examples whose label is in `classes` (None: no such example)."""
    hits = [c for c, y in zip(outcomes.correct, outcomes.label) if y in classes]
    return sum(hits) / len(hits) if hits else None


def h_mean(drop: float, acc_retain: float) -> float:
    """H-mean = 2 · Drop_f · Acc_r / (Drop_f + Acc_r) (arXiv 2403.11530); 0 when the denominator is not positive
    (nothing forgotten and nothing kept, or the forget accuracy rose)."""
    return 2 * drop * acc_retain / (drop + acc_retain) if drop + acc_retain > 0 and drop > 0 else 0.0


def check_forget(forget: list[list[int]], num_labels: int, where: str) -> None:
    """Every forget set names classes of the task, no class twice, and at least one class is kept."""
    seen: list[int] = []
    for i, classes in enumerate(forget):
        if not classes or any(not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < num_labels for c in classes):
            raise UserError(f"{where}: forget[{i}] = {classes!r} must be a non-empty list of class indices "
                            f"0..{num_labels - 1}")
        again = sorted(set(classes) & set(seen))
        if again or len(set(classes)) != len(classes):
            raise UserError(f"{where}: forget[{i}] names class {again or classes} again; each class is forgotten once")
        seen += classes
    if len(seen) >= num_labels:
        raise UserError(f"{where}: forget names every class of the task ({num_labels}); at least one must be kept")


def run_forgetting(spec, progress: bool = True) -> dict:
    """Run one continual-forgetting trial; returns the result part of its record."""
    import statistics
    import sys

    import torch

    from lorabench.config import from_dict
    from lorabench.harness.sequence import ContinualConfig, order_tasks, score_task, sequence_split_hash
    from lorabench.harness.train import train
    from lorabench.harness.trial import seed_everything, start_trial
    from lorabench.measure.memory import peak_rss_mb
    from lorabench.methods import get_method

    t_start = time.perf_counter()
    cfg = from_dict(ContinualConfig, spec.continual.get("config") or {}, "continual")
    (task,) = order_tasks(spec)
    check_forget(cfg.forget, task.num_labels, f"task {task.name}")
    method = get_method(spec.method).from_options(spec.method_options, where=f"method {spec.label}")
    if not hasattr(method, "begin_forgetting"):
        raise UserError(f"method {spec.method!r} has no forgetting protocol (continual.forget); gs-lora has")

    def log(msg: str) -> None:
        if progress:
            sys.stderr.write(f"[forgetting {spec.label} seed {spec.seed}] {msg}\n")
            sys.stderr.flush()

    start = start_trial(spec, method, spec.model or task.default_model, task.head, task.num_labels)
    train_cfg, model, tokenizer, heads = start.train_cfg, start.model, start.tokenizer, start.heads
    split = task.split()
    classes = list(range(task.num_labels))
    eval_seconds = 0.0

    def score():
        nonlocal eval_seconds
        t0 = time.perf_counter()
        ev = score_task(task, model, tokenizer, train_cfg)
        eval_seconds += time.perf_counter() - t0
        return ev

    # 1. the model that will forget: every class learnt (full fine-tuning), the groups folded in
    method.begin_learning(model)
    seed_everything(spec.seed)
    learn_cfg = replace(train_cfg, steps=cfg.learn_steps, lr=cfg.learn_lr if cfg.learn_lr is not None else train_cfg.lr)
    learn = train(model, method, task, tokenizer, learn_cfg, spec.seed, progress=progress)
    method.end_learning(model)
    ev = score()
    per_class = lambda o: [round(class_accuracy(o, [c]), 6) for c in classes]  # noqa: E731
    learned = {"steps": learn.steps, "final_loss": learn.final_loss, "accuracy": round(ev.metrics["accuracy"], 6),
               "per_class": per_class(ev.outcomes), "train_seconds": round(learn.train_seconds, 3)}
    log(f"learnt every class in {learn.steps} steps: accuracy {ev.metrics['accuracy']:.4f}, per class "
        f"{learned['per_class']}")
    stages, losses, rates, train_seconds, forgotten = [], list(learn.loss_curve), [], learn.train_seconds, []
    for t, forget in enumerate(cfg.forget):
        kept = [c for c in classes if c not in forgotten and c not in forget]  # every class not forgotten yet
        acc_f0, acc_r0 = class_accuracy(ev.outcomes, forget), class_accuracy(ev.outcomes, kept)
        retain_train = [e for e in split.train if e["label"] in kept]
        forget_train = [e for e in split.train if e["label"] in forget]
        stage_seed = spec.seed * 1000 + t + 1  # each task its own batches and groups, the same in every run
        seed_everything(stage_seed)
        stream = _subset(task, forget_train).train_batches(tokenizer, train_cfg.batch_size, stage_seed + 500)
        method.begin_forgetting(model, heads, stream, stage_seed)
        result = train(model, method, _subset(task, retain_train), tokenizer, train_cfg, stage_seed, progress=progress)
        method.fold_groups(model)
        train_seconds += result.train_seconds
        losses += result.loss_curve
        if result.train_tokens_per_s is not None:
            rates.append(result.train_tokens_per_s)
        ev = score()
        acc_f, acc_r = class_accuracy(ev.outcomes, forget), class_accuracy(ev.outcomes, kept)
        old = class_accuracy(ev.outcomes, forgotten) if forgotten else None
        drop = acc_f0 - acc_f
        h = h_mean(drop, acc_r)
        m = result.method_metrics
        stages.append({"stage": t, "forget": list(forget), "kept": kept, "steps": result.steps,
                       "final_loss": None if result.final_loss is None else round(result.final_loss, 6),
                       "acc_forget_before": round(acc_f0, 6), "acc_forget": round(acc_f, 6),
                       "acc_retain_before": round(acc_r0, 6), "acc_retain": round(acc_r, 6),
                       "drop_forget": round(drop, 6), "h_mean": round(h, 6),
                       "acc_forgotten_earlier": None if old is None else round(old, 6),
                       "per_class": per_class(ev.outcomes), "groups": m.get("groups"),
                       "zero_groups": m.get("zero_groups"), "group_norms": m.get("group_norms"),
                       "train_seconds": round(result.train_seconds, 3), "method_metrics": m})
        forgotten += forget
        log(f"task {t + 1}/{len(cfg.forget)} (forget {forget}): Acc_f {acc_f0:.3f} -> {acc_f:.3f}, Acc_r "
            f"{acc_r0:.3f} -> {acc_r:.3f}, H-mean {h:.3f}, zero groups {m.get('zero_groups')}/{m.get('groups')}")
    last = stages[-1] if stages else None
    return {
        "metric": "h_mean",
        "higher_is_better": True,
        "score": last["h_mean"] if last else 0.0,
        "metrics": {"h_mean": last["h_mean"] if last else 0.0, "acc_forget": last and last["acc_forget"],
                    "acc_retain": last and last["acc_retain"]},
        "split_hash": sequence_split_hash([split.hash]),
        "n_train": len(split.train),
        "n_val": len(split.val),
        "n_eval": len(split.eval),
        "outcomes": None,
        "majority_label": None,
        "val_score": None,
        "val_curve": [],
        "trained_steps": learn.steps + sum(s["steps"] for s in stages),
        **start.record_fields(method),
        "final_loss": last["final_loss"] if last else learn.final_loss,
        "loss_curve": losses,
        "train_tokens_per_s": round(statistics.median(rates), 1) if rates else None,
        "eval_tokens_per_s": None,
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "method_metrics": last["method_metrics"] if last else {},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "trial_seconds": round(time.perf_counter() - t_start, 3),
        "threads": torch.get_num_threads(),
        "forgetting": {
            "order": spec.continual.get("order", "order"),
            "task": task.name,
            "config": asdict(cfg),
            "classes": classes,
            "learned": learned,
            "stages": stages,
            "h_mean": [s["h_mean"] for s in stages],
            "zero_groups": [s["zero_groups"] for s in stages],
        },
    }
