"""The cross-task scenario's protocol (b): multi-task training of mixtures of LoRA experts, scored per task and
on held-out tasks (issue 17; docs/cross-task.md, "Protocol (b)"; suites/mixture.yaml).

One trial = a method x a split of the pool (training tasks, held-out tasks) x a seed:

1. the method (a mixture of LoRA experts of the cross-task family, lorabench/methods/cross_task/mixture.py, or
   `lora`, the multi-task LoRA reference at the same parameter budget, or `lora-ensemble`, M such LoRAs from
   different seeds whose predictive distributions are averaged) is applied to the pool's model;
2. every training and held-out task is scored on its eval part before training (the adapters are zero at init,
   so this is the base model: the zero-shot baseline of the record, computed once per task and cached);
3. `train.steps` steps on round-robin batches of the training tasks (methods/continual/multitask_lora.round_robin:
   equal shares, each task its own shuffled stream), each example carrying its task's index as `task_ids` for the
   methods that route by task (MOELoRA's gate); the one training loop (harness/train.py), the balancing losses
   through the method's `extra_loss` hook;
4. every training task is scored with its task id (the gate of a task-conditioned method is that task's), every
   held-out task with task id -1 (the mixture has never seen it: MOELoRA uses the mean of its trained tasks' gates;
   token routers route as always), with per-example outcomes and, for a mixture, the experts' load on that task.

`lora-ensemble` repeats steps 1, 3 and 4 for each of its M members (member m from its own seed, initialisation
and batch order) and scores the ensemble: per question, the mean over the members of their softmax over the options
(lorabench/methods/cross_task/lora_ensemble.py); its record's `mixture.ensemble` block has every member's accuracy
per task, the ensemble's, the members' disagreement and the negative log-likelihoods.

The record's score is the mean accuracy over the training tasks; `metrics.held_out` the mean over the held-out
tasks; its `mixture` block has every task's score, outcomes, zero-shot score and expert load; the report's
mixture section reads it (lorabench/report/mixture.py).
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

from lorabench.config import from_dict, option
from lorabench.errors import UserError


@dataclass
class MixtureProtocolConfig:
    knowledge_tasks: list[str] = option(
        help="training tasks whose examples count as 'world knowledge' for LoRAMoE's localized balancing constraint "
             "(the others are 'downstream'); empty: every example is downstream", default_factory=list)
    zero_shot: bool = option(True, "score every task on the base model before training (the zero-shot baseline)")


def split_tasks(entries: list[dict], where: str) -> list:
    from lorabench.tasks import get_task
    tasks = []
    for e in entries:
        task = get_task(e["name"]).from_options(e.get("options") or {}, where=f"task {e['name']}")
        if task.kind != "multiple-choice":
            raise UserError(f"{where}: task {e['name']} is a {task.kind} task; protocol (b) trains one model on tasks "
                            f"sharing one output space: multiple-choice tasks (lorabench/harness/task_pool.py)")
        tasks.append(task)
    return tasks


class MixedTask:
    """The training tasks as the training loop sees one task: round-robin batches, with task ids when the method
    routes by them."""

    def __init__(self, tasks: list, with_ids: bool):
        self.tasks, self.with_ids = tasks, with_ids
        self.name = "+".join(t.name for t in tasks)

    def train_batches(self, tokenizer, batch_size: int, seed: int):
        from lorabench.methods.continual.multitask_lora import round_robin
        return round_robin(self.tasks, tokenizer, batch_size, seed, task_ids=self.with_ids)


def run_mixture(spec, progress: bool = True) -> dict:
    """One protocol (b) trial; returns the result part of its record."""
    import sys

    import torch

    from lorabench import assets
    from lorabench.harness.cross_task import cached_eval
    from lorabench.harness.sequence import accuracy, pack, score_tasks, sequence_split_hash
    from lorabench.harness.train import train
    from lorabench.harness.trial import seed_everything, start_trial
    from lorabench.measure.memory import peak_rss_mb
    from lorabench.methods import get_method
    from lorabench.methods.base import ApplyContext
    from lorabench.methods.cross_task.lora_ensemble import LoraEnsemble
    from lorabench.methods.cross_task.mixture import MixtureMethod

    t_start = time.perf_counter()
    cfg = from_dict(MixtureProtocolConfig, spec.mixture.get("config") or {}, "mixture")
    train_tasks = split_tasks(spec.mixture["train"], "mixture")
    held_out = split_tasks(spec.mixture["held_out"], "mixture")
    method = get_method(spec.method).from_options(spec.method_options, where=f"method {spec.label}")
    is_mixture = isinstance(method, MixtureMethod)
    is_ensemble = isinstance(method, LoraEnsemble)
    if not is_mixture and not is_ensemble and spec.method != "lora":
        raise UserError(f"method {spec.method!r} is neither a mixture of LoRA experts nor lora nor lora-ensemble; "
                        f"protocol (b) trains those (lorabench/methods/cross_task/mixture.py)")
    names = [t.name for t in train_tasks]
    bad = [t for t in cfg.knowledge_tasks if t not in names]
    if bad:
        raise UserError(f"mixture.knowledge_tasks names {bad}, not training tasks of split "
                        f"{spec.mixture.get('split')}: {names}")

    def log(msg: str) -> None:
        if progress:
            sys.stderr.write(f"[mixture {spec.label} seed {spec.seed}] {msg}\n")
            sys.stderr.flush()

    model_name = spec.model or train_tasks[0].default_model
    start = start_trial(spec, method, model_name, "causal-lm")
    train_cfg, model, tokenizer = start.train_cfg, start.model, start.tokenizer
    trainable = start.trainable  # lora-ensemble's: times its members, below
    if is_mixture:
        method.set_task(0, trained_tasks=len(train_tasks))
        method.routing.knowledge_task_ids = {names.index(t) for t in cfg.knowledge_tasks}

    options = {e["name"]: e.get("options") or {} for e in spec.mixture["train"] + spec.mixture["held_out"]}
    all_tasks = [(t, i) for i, t in enumerate(train_tasks)] + [(t, -1) for t in held_out]
    every_task, task_ids = [t for t, _ in all_tasks], [i for _, i in all_tasks]

    def scoring(j: int):
        """The model that scores task j: a mixture's gate set to the task's id (-1: held out)."""
        if is_mixture:
            method.set_task(task_ids[j])
        return nullcontext(model)

    zero = {}
    t0 = time.perf_counter()
    if cfg.zero_shot:   # B = 0 at init: every adapter adds exactly zero, so this is the base model
        for j, task in enumerate(every_task):
            split = task.split()
            key = {"scenario": "mixture", "model": model_name,
                   "model_sha256": start.loaded.info.get("sha256"),  # random:SEED
                   "task": task.name, "task_options": options[task.name],
                   "eval_hash": split.part_hash("eval"), "eval_batch_size": train_cfg.eval_batch_size,
                   "autocast": train_cfg.autocast, "adapter": None}

            def run(j=j):
                ((_, ev),) = score_tasks(every_task, scoring, tokenizer, train_cfg, only=[j])
                return {"score": accuracy(ev), "outcomes": pack(ev.outcomes.correct)}
            zero[task.name] = cached_eval(key, run)
        if is_mixture:
            for m in method.mixture_layers(model):
                m.reset_stats()
    zero_seconds = time.perf_counter() - t0

    seed_everything(spec.seed)
    result = train(model, method, MixedTask(train_tasks, is_mixture), tokenizer, train_cfg, spec.seed,
                   progress=progress)
    log(f"trained {result.steps} steps on {', '.join(names)}: loss {result.final_loss}")
    t0 = time.perf_counter()
    per_task, member_scores, members = {}, {}, [result]
    for j, ev in score_tasks(every_task, scoring, tokenizer, train_cfg):
        task = every_task[j]
        load = method.router_metrics(model) if is_mixture else {}   # the experts' load on this task
        per_task[task.name] = {"score": accuracy(ev), "held_out": task_ids[j] < 0,
                               "outcomes": pack(ev.outcomes.correct), "n_eval": len(ev.outcomes.correct),
                               "eval_hash": task.split().part_hash("eval"), "router": load}
        member_scores[task.name] = [ev.option_scores]
    eval_seconds = time.perf_counter() - t0
    ensemble_block = None
    if is_ensemble:   # members 1..M-1, each from its own seed, then the ensemble of all M (member 0 trained above)
        from lorabench.methods.cross_task.lora_ensemble import ensemble, member_seed
        for m in range(1, method.config.members):
            ms = member_seed(spec.seed, m)
            member = get_method(spec.method).from_options(spec.method_options, where=f"method {spec.label}")
            seed_everything(ms)
            m_model = assets.load_model(model_name, head="causal-lm", seed=spec.seed).model   # the same base
            m_model = member.apply(m_model, ApplyContext(architecture=m_model.config.model_type, head_modules=[],
                                                         seed=ms))
            seed_everything(ms)
            members.append(train(m_model, member, MixedTask(train_tasks, False), tokenizer, train_cfg, ms,
                                 progress=progress))
            log(f"member {m} (seed {ms}) trained: loss {members[-1].final_loss}")
            t0 = time.perf_counter()
            for j, ev in score_tasks(every_task, lambda j, mm=m_model: nullcontext(mm), tokenizer, train_cfg):
                member_scores[every_task[j].name].append(ev.option_scores)
            eval_seconds += time.perf_counter() - t0
            del m_model
        ensemble_block = {"members": method.config.members,
                          "member_seeds": [member_seed(spec.seed, m) for m in range(method.config.members)],
                          "member_final_loss": [r.final_loss for r in members], "tasks": {}}
        for task, _ in all_tasks:
            labels = [int(e["label"]) for e in task.examples("eval")]
            ens = ensemble(member_scores[task.name], labels)
            per_task[task.name].update(score=round(ens["accuracy"], 6), outcomes=pack(ens["correct"]))
            ensemble_block["tasks"][task.name] = {
                "accuracy": round(ens["accuracy"], 6), "nll": round(ens["nll"], 6),
                "member_accuracy": [round(a, 6) for a in ens["member_accuracy"]],
                "member_nll": [round(x, 6) for x in ens["member_nll"]],
                "disagreement": round(ens["disagreement"], 6), "any_disagreement": round(ens["any_disagreement"], 6)}
        log("ensemble: " + ", ".join(f"{k} {v['accuracy']:.3f} (members {v['member_accuracy']}, disagreement "
                                     f"{v['disagreement']:.3f})" for k, v in ensemble_block["tasks"].items()))
        trainable *= method.config.members
    trained_avg = sum(per_task[t]["score"] for t in names) / len(names)
    held_avg = sum(per_task[t.name]["score"] for t in held_out) / len(held_out) if held_out else None
    log("scores: " + ", ".join(f"{k} {v['score']:.3f}" for k, v in per_task.items()))
    splits = [t.split() for t, _ in all_tasks]
    return {
        "metric": "accuracy",
        "higher_is_better": True,
        "score": round(trained_avg, 6),
        "metrics": {"accuracy": round(trained_avg, 6), "held_out": None if held_avg is None else round(held_avg, 6)},
        "split_hash": sequence_split_hash([s.hash for s in splits]),
        "n_train": sum(len(s.train) for s in splits[: len(train_tasks)]),
        "n_val": 0,
        "n_eval": sum(len(s.eval) for s in splits),
        "outcomes": None,
        "majority_label": None,
        "val_score": None,
        "val_curve": [],
        "trained_steps": result.steps,
        **start.record_fields(method, trainable=trainable),
        "final_loss": result.final_loss,
        "loss_curve": result.loss_curve,
        "train_tokens_per_s": None if result.train_tokens_per_s is None else round(result.train_tokens_per_s, 1),
        "eval_tokens_per_s": None,
        "train_seconds": round(sum(r.train_seconds for r in members), 3),
        "eval_seconds": round(eval_seconds + zero_seconds, 3),
        "method_metrics": result.method_metrics,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "trial_seconds": round(time.perf_counter() - t_start, 3),
        "threads": torch.get_num_threads(),
        "mixture": {
            "split": spec.mixture.get("split"),
            "train_tasks": names,
            "held_out_tasks": [t.name for t in held_out],
            "config": asdict(cfg),
            "tasks": per_task,
            "zero_shot": zero,
            "trained_average": round(trained_avg, 6),
            "held_out_average": None if held_avg is None else round(held_avg, 6),
            **({"ensemble": ensemble_block} if ensemble_block is not None else {}),
        },
    }
