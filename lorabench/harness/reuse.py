"""The cross-task scenario's reuse protocol (issue 17; docs/cross-task.md, "The reuse protocol"; suites/reuse.yaml):
PERU-LoRA's setting (arXiv 2310.01886, sec. 3.2 and its experiments), neither leave-one-task-out (here every task's
own adapter is reused) nor protocol (b) (nothing is trained in the trial).

One trial = a reuse method (`peru-lora`, lorabench/methods/cross_task/peru_lora.py) x a seed, over the suite's pool:

1. the library: one LoRA per pool task (lorabench/harness/multitask.py, trained fused and cached by adapter id,
   the same adapters the leave-one-task-out protocol composes);
2. the method builds the merged model θ* (task arithmetic over all the library's adapters) and, per task, θ* plus
   that task's own update cut to rank q;
3. every pool task is scored on its eval part with its own reuse, beside three baselines on the same examples:
   zero-shot (the base model), the merged model alone (task arithmetic), and the task's own full-rank adapter (a
   fine-tuned model per task); the zero-shot and own-adapter evaluations are the leave-one-task-out protocol's
   cached ones (`cross_task.cached_eval`, the same keys).

The record's score is the mean over the pool of the method's per-task scores; its `reuse` block has every task's
scores and per-example outcomes for each rule, what the rank-q cut keeps, and the parameters each task adds to the
merged model (q Σ (d + k) against the full adapter's r Σ (d + k)); the report's reuse section reads it
(lorabench/report/reuse.py). The library does not depend on the trial's seed; the seed is the trial's identity ; the
library is trained at the trial's seed unless `library_seed` fixes it (at seed 0 it is the leave-one-task-out
protocol's library when the recipe is the same: the adapter ids do not depend on the protocol).
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

from lorabench.config import from_dict, option
from lorabench.errors import UserError


@dataclass
class ReuseConfig:
    library_rank: int = option(8, "LoRA rank r of every library adapter", low=1, high=256)
    library_alpha: float = option(16.0, "LoRA alpha of every library adapter", low=0.0)
    library_steps: int = option(100, "training steps of every library adapter", low=1)
    library_batch_size: int = option(8, "examples per step of every library adapter", low=1)
    library_lr: float = option(5e-4, "learning rate of every library adapter (AdamW, linear decay)", low=0.0)
    library_seed: int | None = option(None, "the seed the library is trained at; None: the trial's seed (seeds then "
                                            "vary the fine-tuning, the variance the paper reports over)", low=0)
    adapters_per_job: int = option(4, "library adapters trained together in one fused job", low=1)
    library_tokens_per_job: int = option(2048, "a fused library job's padded tokens per step at most; longer tasks "
                                               "train fewer adapters at a time (multitask.plan_jobs)", low=1)


def run_reuse(spec, progress: bool = True) -> dict:
    """One reuse trial; returns the result part of its record."""
    import torch
    import transformers

    from lorabench import assets
    from lorabench.harness.cross_task import cached_eval, composer_for, library_train
    from lorabench.harness.mixture import split_tasks
    from lorabench.harness.sequence import sequence_split_hash
    from lorabench.harness.multitask import LibraryConfig, build_library, load_library_adapter
    from lorabench.harness.train import TrainConfig, precision
    from lorabench.harness.trial import composition_record_fields, seed_everything
    from lorabench.measure.memory import peak_rss_mb
    from lorabench.methods import get_method
    from lorabench.methods.cross_task.base import check_library

    t_start = time.perf_counter()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    c = from_dict(ReuseConfig, spec.reuse["config"], "reuse")
    train_cfg = from_dict(TrainConfig, spec.train, "train")
    method = get_method(spec.method).from_options(spec.method_options, where=f"method {spec.label}")
    if not hasattr(method, "reuse"):
        raise UserError(f"method {spec.method!r} has no reuse rule; the reuse protocol runs peru-lora")
    tasks = split_tasks(spec.reuse["tasks"], "reuse")
    names = [t.name for t in tasks]
    model_name = spec.model or tasks[0].default_model

    def log(msg: str) -> None:
        if progress:
            sys.stderr.write(f"[reuse {spec.label} seed {spec.seed}] {msg}\n")
            sys.stderr.flush()

    lib_seed = spec.seed if c.library_seed is None else c.library_seed
    lib = LibraryConfig(rank=c.library_rank, alpha=c.library_alpha, adapters_per_job=c.adapters_per_job,
                        tokens_per_job=c.library_tokens_per_job)
    t_lib = time.perf_counter()
    paths = build_library(names, model_name, lib, library_train(c), seed=lib_seed, progress=progress)
    library_seconds = time.perf_counter() - t_lib
    states = [load_library_adapter(paths[t]) for t in names]
    scale = c.library_alpha / c.library_rank
    seed_everything(spec.seed)
    loaded = assets.load_model(model_name, head="causal-lm", seed=lib_seed)
    base, tok = loaded.model.eval(), loaded.tokenizer
    composers: dict = {}
    t0 = time.perf_counter()
    built = method.reuse(states, scale)
    reuse_seconds = time.perf_counter() - t0

    def scored(task, model) -> dict:
        model.eval()
        with precision(train_cfg):
            e = task.evaluate(model, tok, train_cfg.eval_batch_size)
        return {"score": round(float(e.metrics[task.metric.name]), 6),
                "outcomes": e.outcomes.to_record(task.split().part_hash("eval")) if e.outcomes else None,
                "seconds": round(e.seconds, 3)}

    block_tasks, eval_seconds = {}, 0.0
    for i, task in enumerate(tasks):
        split = task.split()
        key = {"model": model_name, "model_sha256": loaded.info.get("sha256"), "model_seed": lib_seed,
               "task": task.name, "task_options": spec.reuse["tasks"][i].get("options") or {},
               "eval_hash": split.part_hash("eval"), "eval_batch_size": train_cfg.eval_batch_size,
               "autocast": train_cfg.autocast}
        own = {k: (v * scale if k.endswith(".lora_B") else v) for k, v in states[i].items()}
        entry = {
            "peru": scored(task, composer_for(base, built["per_task"][i], composers)),
            "merged": scored(task, composer_for(base, built["merged"], composers)),
            "own": cached_eval({**key, "adapter": paths[task.name].stem},
                               lambda t=task, s=own: scored(t, composer_for(base, s, composers))),
            "zero-shot": cached_eval({**key, "adapter": None}, lambda t=task: scored(t, base)),
            **built["stats"][i], "adapter": paths[task.name].stem, "n_eval": len(split.eval),
            "metric": task.metric.name,
        }
        eval_seconds += entry["peru"]["seconds"] + entry["merged"]["seconds"]
        block_tasks[task.name] = entry
        log(f"{task.name}: peru {entry['peru']['score']:.3f}, merged {entry['merged']['score']:.3f}, own "
            f"{entry['own']['score']:.3f}, zero-shot {entry['zero-shot']['score']:.3f}")
    layers = check_library(states)
    per_rank = sum(states[0][f"{p}.lora_A"].shape[1] + states[0][f"{p}.lora_B"].shape[0] for p in layers)   # Σ (d + k)
    score = sum(e["peru"]["score"] for e in block_tasks.values()) / len(block_tasks)
    means = {r: round(sum(e[r]["score"] for e in block_tasks.values()) / len(block_tasks), 6)
             for r in ("peru", "merged", "own", "zero-shot")}
    splits = [t.split() for t in tasks]
    return {
        "metric": "accuracy", "higher_is_better": True, "score": round(score, 6),
        "metrics": {"accuracy": round(score, 6), **{f"mean_{k.replace('-', '_')}": v for k, v in means.items()}},
        "split_hash": sequence_split_hash([s.hash for s in splits]),
        "n_train": 0, "n_val": 0, "n_eval": sum(len(s.eval) for s in splits),
        "outcomes": None, "majority_label": None, "val_score": None, "val_curve": [],
        "reuse": {"config": asdict(c), "tasks": block_tasks, "library": {t: paths[t].stem for t in names},
                  "library_seed": lib_seed,
                  "library_seconds": round(library_seconds, 3), "reuse_seconds": round(reuse_seconds, 3),
                  "keep_rank": method.config.keep_rank, "merge_lambda": method.config.merge_lambda,
                  "task_params": {"peru": method.config.keep_rank * per_rank, "own": c.library_rank * per_rank},
                  "merged_rank": len(states) * c.library_rank},
        **composition_record_fields(loaded, method, train_cfg),
        "eval_seconds": round(eval_seconds, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "trial_seconds": round(time.perf_counter() - t_start, 3),
        "threads": torch.get_num_threads(),
    }
