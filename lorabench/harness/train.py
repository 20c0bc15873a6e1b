"""The training loop: one loop for every method; methods take part only through their hooks.

Lifecycle (torchtune's recipe pattern): setup (optimizer from the method's parameter groups,
linear warm-up + decay schedule) -> steps -> cleanup. Each step: hooks.on_step_begin, forward,
task loss + method.extra_loss, backward, hooks.on_after_backward, gradient clipping, optimizer
step, hooks.on_step_end. Throughput is the median of per-step tokens/s after warm-up.
With `val_every`, the model is scored on the task's validation part every that many steps (the
learning curve budgets are chosen from); the RNG state is saved and restored around each
validation, so the training run is the same with or without it.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from lorabench.config import option
from lorabench.methods.base import Method, TrainState


@dataclass
class TrainConfig:
    steps: int = option(200, "optimizer steps (the same for every method: the protocol's fixed budget)", low=0)
    batch_size: int = option(32, "examples per step", low=1)
    lr: float | None = option(None, "peak learning rate; None = the method's recommended default_lr", low=0.0)
    weight_decay: float = option(0.0, "AdamW weight decay", low=0.0)
    warmup_ratio: float = option(0.06, "fraction of steps of linear warm-up", low=0.0, high=1.0)
    schedule: Literal["linear", "cosine", "constant"] = option("linear", "decay after warm-up")
    max_grad_norm: float | None = option(1.0, "clip the global gradient norm to this (None = no clipping)", low=0.0)
    eval_batch_size: int = option(64, "examples per evaluation batch", low=1)
    warmup_steps_for_throughput: int = option(3, "steps excluded from the throughput median (allocator, caches)", low=0)
    threads: int | None = option(None, "torch intra-op threads; None = all cores", low=1)
    loss_curve_every: int = option(10, "record the mean training loss every this many steps", low=1)
    autocast: Literal["off", "bf16", "bf16-fp32-attention"] = option(
        "off", "bf16: forward passes (training, validation, evaluation) under torch.autocast(bfloat16), weights and "
               "optimizer state in fp32; bf16-fp32-attention: the same with the models' SDPA attention in fp32 (on "
               "CPU bf16 SDPA's backward is ~7x slower than fp32's); fast only on CPUs with AVX-512 BF16 or AMX "
               "(`lorabench env`)")
    val_every: int | None = option(None, "score the validation split every this many steps (the validation curve; "
                                   "None = only after training)", low=1)


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    loss_curve: list[float] = field(default_factory=list)   # mean loss of each loss_curve_every window
    train_tokens_per_s: float | None = None                 # median over steps after warm-up
    train_seconds: float = 0.0
    method_metrics: dict = field(default_factory=dict)
    val_curve: list[list[float]] = field(default_factory=list)  # [step, validation score] every val_every steps
    val_seconds: float = 0.0                                     # time spent validating (not in train_seconds)


def lr_lambda(cfg: TrainConfig):
    warm = int(round(cfg.warmup_ratio * cfg.steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, cfg.steps - warm)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


@contextlib.contextmanager
def precision(cfg: TrainConfig):
    """The context every forward pass of a trial runs in: nothing (fp32), bf16 autocast, or bf16 autocast with the
    models' SDPA attention in fp32 (sdpa_in_fp32)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast != "off"):
        with sdpa_in_fp32() if cfg.autocast == "bf16-fp32-attention" else contextlib.nullcontext():
            yield


@contextlib.contextmanager
def sdpa_in_fp32():
    """transformers' "sdpa" attention run in fp32 (autocast off, query, key, value and a float mask upcast; the output
    cast back to the query's dtype) while the context lasts, for every model of this process; restored after.
    Why: under bf16 autocast on this project's AMX Xeon, torch's CPU flash-attention backward took 4.6 s of a
    SmolLM2-135M LoRA step against 0.6 s in fp32 (torch.profiler, one thread), so bf16 steps were only 1.29x faster
    than fp32 ones; with attention in fp32, 1.65x. The models' linear layers (the GEMMs) stay in bf16. Methods that
    bring their own eager attention (HiddenKey, LongLoRA, SinkLoRA: lorabench/methods/attention.py) are unaffected:
    their matmuls follow autocast, their softmax is fp32 already."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    had_local = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
    previous = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def sdpa_fp32(module, query, key, value, attention_mask, *args, **kwargs):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        with torch.autocast("cpu", enabled=False):
            out, weights = previous(module, query.float(), key.float(), value.float(), attention_mask, *args, **kwargs)
        return out.to(query.dtype), weights

    sdpa_fp32.upcasts = True   # what the tests look for
    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_fp32
    try:
        yield
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = previous
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]


@contextlib.contextmanager
def target_rows_head(model: torch.nn.Module, method: Method, batch: dict):
    """A causal LM's output layer computed only at the positions whose next token is a target during one training
    forward; zeros at the others. transformers' causal-LM loss reads only those positions (labels shifted by one,
    -100 ignored), so the loss and every gradient are those of the whole logits, while the vocabulary-sized matrix
    product (49,152 x 576 a token on SmolLM2, a fifth of its forward and of its backward) runs on the few answer
    tokens of a multiple-choice batch instead of every position. Each kept row is the same dot products as in the
    whole product (measured bit for bit on this machine's BLAS, forward and backward: tests/test_train_target_rows.py).
    Left as it is where a loss could read other positions: no labels, a trainable output layer (its weight
    gradient sums over positions), a method that reads the training logits (`logits_everywhere_in_training`), a
    call with another batch shape (a method's own pass)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    labels = batch.get("labels")
    if (not isinstance(head, torch.nn.Linear) or labels is None or labels.dim() != 2
            or method.logits_everywhere_in_training or getattr(model.config, "is_encoder_decoder", False)
            or any(p.requires_grad for p in head.parameters())):
        yield
        return
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    rows = keep.nonzero(as_tuple=True)
    full = head.forward

    def forward(h: torch.Tensor) -> torch.Tensor:
        if h.shape[:-1] != keep.shape:
            return full(h)
        part = full(h[rows])
        out = part.new_zeros(*h.shape[:-1], part.shape[-1])
        out[rows] = part
        return out
    own = head.__dict__.get("forward")   # a forward set on this module before (none in lorabench today)
    head.forward = forward
    try:
        yield
    finally:
        if own is None:
            del head.forward   # the class's forward again
        else:
            head.forward = own


def validate(model: torch.nn.Module, task, tokenizer, batch_size: int, cfg: TrainConfig | None = None) -> float:
    """The task's primary metric on its validation part, with the RNG streams left as they were."""
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]), precision(cfg or TrainConfig()):
        score = task.evaluate(model, tokenizer, batch_size, part="val").metrics[task.metric.name]
    model.train(was_training)
    return float(score)


def train(model: torch.nn.Module, method: Method, task, tokenizer, cfg: TrainConfig, seed: int,
          progress: bool = True) -> TrainResult:
    lr = cfg.lr if cfg.lr is not None else method.default_lr
    groups = method.param_groups(model, lr, cfg.weight_decay)
    if cfg.steps == 0 or not groups:
        # Nothing to train (e.g. `head` on a causal-LM task): the zero-shot model.
        return TrainResult(steps=0, final_loss=None)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, step=0, total_steps=cfg.steps)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    batches = method.train_batches(state, task, tokenizer, cfg.batch_size, seed)  # the task's, unless the method chooses
    model.train()
    method.on_train_begin(state)
    if cfg.val_every is not None and cfg.val_every > cfg.steps:
        raise ValueError(f"train.val_every={cfg.val_every} is more than train.steps={cfg.steps}: the validation "
                         f"curve would be empty; use at most {cfg.steps}")
    rates, window, curve, val_curve = [], [], [], []
    loss_value, val_seconds = None, 0.0
    t_start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"train {method.name} on {task.name}", disable=not progress,
               leave=False, dynamic_ncols=True)
    for step in bar:
        batch = next(batches)
        t0 = time.perf_counter()
        state.step, state.batch = step, batch
        method.on_step_begin(state)
        with precision(cfg), target_rows_head(model, method, batch):
            loss = model(**batch).loss
        extra = method.extra_loss(state)
        if extra is not None:
            loss = loss + extra
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step} (diverged); lower the learning rate")
        state.loss = loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.on_after_backward(state)
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        method.on_step_end(state)
        dt = time.perf_counter() - t0
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        if step >= cfg.warmup_steps_for_throughput:
            rates.append(tokens / dt)
        loss_value = loss.item()
        window.append(loss_value)
        if len(window) == cfg.loss_curve_every:
            curve.append(sum(window) / len(window))
            window = []
        if cfg.val_every is not None and (step + 1) % cfg.val_every == 0:
            tv = time.perf_counter()
            val_curve.append([step + 1, round(validate(model, task, tokenizer, cfg.eval_batch_size, cfg), 6)])
            val_seconds += time.perf_counter() - tv
        bar.set_postfix(loss=f"{loss_value:.4f}")
    bar.close()
    method.on_train_end(state)
    model.eval()
    return TrainResult(steps=cfg.steps, final_loss=loss_value, loss_curve=[round(x, 5) for x in curve],
                       train_tokens_per_s=statistics.median(rates) if rates else None,
                       train_seconds=time.perf_counter() - t_start - val_seconds,
                       method_metrics=dict(state.metrics), val_curve=val_curve, val_seconds=val_seconds)
