"""One trial, in its own process: load model -> apply method -> train -> evaluate -> measure.

`run_trial(spec)` returns the result part of a record; the runner adds identity and status.
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lorabench.config import from_dict
from lorabench.harness.train import TrainConfig, precision, train, validate
from lorabench.measure.memory import cuda_peak_mb, current_rss_mb, peak_rss_mb
from lorabench.methods import get_method
from lorabench.methods.base import ApplyContext, Method
from lorabench.tasks import get_task


@dataclass
class TrialSpec:
    """Everything that defines a trial; its canonical JSON is hashed into the trial id."""
    suite: str
    suite_version: int
    label: str                 # the method's label in the suite (a method may appear with several configs)
    method: str
    method_options: dict = field(default_factory=dict)
    task: str = ""
    task_options: dict = field(default_factory=dict)
    model: str | None = None   # None = the task's default model
    seed: int = 0
    train: dict = field(default_factory=dict)
    lm_eval: bool = False      # also score the trained model on its task through lm-evaluation-harness
    federated: dict | None = None  # the clients scenario's options (lorabench/harness/clients.py), partition included
    cross_task: dict | None = None  # the cross-task scenario's options (lorabench/harness/cross_task.py)
    continual: dict | None = None  # the sequence scenario's order and options (lorabench/harness/sequence.py)
    mixture: dict | None = None  # protocol (b)'s split and options (lorabench/harness/mixture.py)
    reuse: dict | None = None  # the reuse protocol's pool and options (lorabench/harness/reuse.py)


# The classification head of transformers' sequence-classification models. BERT's pooler is part
# of it (pooler -> dropout -> classifier): sentence-embedding checkpoints such as all-MiniLM-L6-v2
# were trained with mean pooling, so their [CLS] pooler is not adapted to any task.
HEAD_NAMES = ("classifier", "score", "pre_classifier", "bert.pooler")


def head_modules(model: torch.nn.Module, head: str) -> list[str]:
    """Task-head modules trained by every method (PEFT's modules_to_save, plus BERT's pooler)."""
    if head != "seq-cls":
        return []
    names = {n for n, _ in model.named_modules()}
    return [h for h in HEAD_NAMES if h in names]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


@dataclass
class StartedTrial:
    """What `start_trial` made: the trial's training config, its model with the method applied, and its counts."""
    train_cfg: TrainConfig
    loaded: Any                # assets.LoadedModel: the model as loaded, its tokenizer and its info (name, sha256)
    model: torch.nn.Module     # the model with the method applied
    tokenizer: Any
    heads: list[str]           # the task-head modules every method trains (head_modules)
    trainable: int             # the method's trainable parameters
    total: int                 # every parameter of the adapted model
    rss_after_load_mb: float   # the process's RSS once the model was loaded, before the method was applied

    def record_fields(self, method: Method, adapter_bytes: int | None = None, trainable: int | None = None) -> dict:
        """The record's fields that come from the start-up, in the record's order: the model, the parameter counts
        (`trainable`: another count, e.g. an ensemble's members together), the saved adapter's size, the training
        config with the learning rate used, and the method's config, family and paper."""
        lr_used = self.train_cfg.lr if self.train_cfg.lr is not None else method.default_lr
        return {
            "model_info": self.loaded.info,
            "trainable_params": self.trainable if trainable is None else trainable,
            "total_params": self.total,
            "adapter_bytes": adapter_bytes,
            "train": asdict(self.train_cfg) | {"lr_used": lr_used},
            **method_fields(method),
        }


def method_fields(method: Method) -> dict:
    """The record's fields that say which method ran: its config, family and paper (every scenario's record)."""
    return {"method_config": method.config_dict(), "family": method.family, "paper": method.paper}


def composition_record_fields(loaded, method: Method, train_cfg: TrainConfig) -> dict:
    """The record's start-up fields in a trial that trains nothing itself but composes a library of adapters
    trained once and cached (the cross-task scenario and the reuse protocol: harness/cross_task.py, reuse.py),
    in the record's order: the model as loaded (assets.LoadedModel), no trainable parameters, the method, and
    the training config as read (its evaluation batch size and precision are what the trial used)."""
    return {"model_info": loaded.info, "trainable_params": 0, **method_fields(method), "train": asdict(train_cfg)}


def start_trial(spec: TrialSpec, method: Method, model: str, head: str, num_labels: int | None = None) -> StartedTrial:
    """The start-up every trial shares: the single-task trial (`run_trial`) and the sequence, mixture and forgetting
    scenarios (harness/sequence.py, mixture.py, forgetting.py), called once the scenario has checked its options.

    transformers' logging quieted (the trial prints its own progress; load reports and weight-loading bars are
    noise), `spec.train` read into a TrainConfig and its threads set, the trial seed fixed, the model loaded
    (a classification head's random init depends on the trial seed), the method applied at the same seed, and its
    trainable and the model's total parameters counted."""
    import transformers

    from lorabench import assets

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    train_cfg = from_dict(TrainConfig, spec.train, "train")
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    seed_everything(spec.seed)  # the task head's random init depends on the trial seed
    loaded = assets.load_model(model, head=head, num_labels=num_labels, seed=spec.seed)
    rss_loaded = current_rss_mb()
    heads = head_modules(loaded.model, head)
    ctx = ApplyContext(architecture=loaded.model.config.model_type, head_modules=heads, seed=spec.seed)
    seed_everything(spec.seed)
    adapted = method.apply(loaded.model, ctx)
    return StartedTrial(train_cfg=train_cfg, loaded=loaded, model=adapted, tokenizer=loaded.tokenizer, heads=heads,
                        trainable=sum(p.numel() for _, p in method.trainable_parameters(adapted)),
                        total=sum(p.numel() for p in adapted.parameters()), rss_after_load_mb=rss_loaded)


def scored_fields(task, split, ev) -> dict:
    """The part of a record that says what was scored and how (metric, score, split sizes and hash,
    per-example outcomes, the training split's majority label); shared by the single-task trial and
    the clients scenario (lorabench/harness/clients.py)."""
    metrics = {k: round(float(v), 6) for k, v in ev.metrics.items()}
    return {
        "metric": task.metric.name,
        "higher_is_better": task.metric.higher_is_better,
        "score": metrics[task.metric.name],
        "metrics": metrics,
        "split_hash": split.hash,
        "n_train": len(split.train),
        "n_val": len(split.val),
        "n_eval": len(split.eval),
        "outcomes": None if ev.outcomes is None else ev.outcomes.to_record(split.part_hash("eval")),
        "majority_label": task.majority_label(),
    }


def run_trial(spec: TrialSpec, progress: bool = True) -> dict:
    if spec.cross_task is not None:  # composition method x held-out task x seed: the cross-task scenario
        from lorabench.harness.cross_task import run_cross_task
        return run_cross_task(spec, progress=progress)
    if spec.federated is not None:  # method x partition x seed on Flower's simulation: the clients scenario
        from lorabench.harness.clients import run_federated
        return run_federated(spec, progress=progress)
    if spec.reuse is not None:  # method x seed over the pool, every task's own adapter reused: the reuse protocol
        from lorabench.harness.reuse import run_reuse
        return run_reuse(spec, progress=progress)
    if spec.mixture is not None:  # method x split x seed, multi-task training: the cross-task protocol (b)
        from lorabench.harness.mixture import run_mixture
        return run_mixture(spec, progress=progress)
    if spec.continual is not None:  # method x order x seed, tasks one after another: the sequence scenario
        from lorabench.harness.sequence import run_sequence
        return run_sequence(spec, progress=progress)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    task = get_task(spec.task).from_options(spec.task_options, where=f"task {spec.task}")
    method = get_method(spec.method).from_options(spec.method_options, where=f"method {spec.label}")
    split = task.split()
    start = start_trial(spec, method, spec.model or task.default_model, task.head, task.num_labels)
    train_cfg, model, tokenizer = start.train_cfg, start.model, start.tokenizer

    result = train(model, method, task, tokenizer, train_cfg, spec.seed, progress=progress)
    model.eval()
    with precision(train_cfg):
        ev = task.evaluate(model, tokenizer, train_cfg.eval_batch_size)
    val_score = None
    if split.val:  # the model-selection score (learning-rate grids), never the test split's
        last = result.val_curve[-1] if result.val_curve else None
        same_model = type(method).on_train_end is Method.on_train_end  # nothing changed after the last step
        if last is not None and last[0] == result.steps and same_model:
            val_score = last[1]
        else:
            val_score = round(validate(model, task, tokenizer, train_cfg.eval_batch_size, train_cfg), 6)

    with tempfile.TemporaryDirectory() as d:
        adapter_bytes = method.save_adapter(model, os.path.join(d, "adapter.safetensors"))

    out = {
        **scored_fields(task, split, ev),
        "val_score": val_score,
        "val_curve": result.val_curve,
        "trained_steps": result.steps,
        **start.record_fields(method, adapter_bytes),
        "final_loss": result.final_loss,
        "loss_curve": result.loss_curve,
        "train_tokens_per_s": None if result.train_tokens_per_s is None else round(result.train_tokens_per_s, 1),
        "eval_tokens_per_s": round(ev.n_tokens / ev.seconds, 1) if ev.seconds > 0 else None,
        "train_seconds": round(result.train_seconds, 3),
        "eval_seconds": round(ev.seconds, 3),
        "method_metrics": result.method_metrics,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_after_load_mb": round(start.rss_after_load_mb, 1),
        "trial_seconds": round(time.perf_counter() - t_start, 3),
        # CPU time of this process over the same span (user + system): on a shared core the wall times above
        # grow with the load beside the trial, this one much less (docs/architecture.md, "Where a trial's time goes")
        "trial_cpu_seconds": round(time.process_time() - cpu_start, 3),
        "threads": torch.get_num_threads(),  # the trial's own (train.threads), not the runner's
    }
    if spec.lm_eval:  # the same trained model, scored by lm-eval on the exported task (lorabench.lmeval)
        from lorabench.lmeval.run import score_in_trial
        out["lm_eval"] = score_in_trial(model, tokenizer, task, train_cfg.eval_batch_size)
    cuda = cuda_peak_mb()
    if cuda:
        out.update({k: round(v, 1) for k, v in cuda.items()})
    return out
