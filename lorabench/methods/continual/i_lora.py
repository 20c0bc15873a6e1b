"""I-LoRA: interpolation-based LoRA, a dual-memory experience replay (Ren et al., "Analyzing and Reducing
Catastrophic Forgetting in Parameter Efficient Tuning", arXiv 2402.18865).

Two learners share the frozen model: a fast learner (the LoRA adapter being trained, the working memory)
and a slow learner (the long-term memory), whose LoRA weights are an interpolation of the fast ones,
updated after every optimizer step by an exponential moving average

    θ_slow <- λ θ_slow + (1 - λ) θ_fast                       (λ = `ema`)

The fast learner trains on batches that mix the current task with a small replay memory (replay-lora's
buffer and shares), and on the replayed examples a consistency loss pulls its hidden states towards the
slow learner's:

    L = L_task(current ∪ memory) + γ · mean ||h_fast(x_mem) - h_slow(x_mem)||^2     (γ = `consistency`)

over the last layer's hidden states at the memory rows' non-padding positions. Every task is scored
with the slow learner, the one the paper evaluates. Without a memory (the first task, or a single-task
trial) there is no consistency term, and a single-task trial scores the fast learner as any trial does:
LoRA, with the slow weights tracked.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.continual.base import Stage
from lorabench.methods.continual.replay_lora import ReplayConfig, ReplayLoRA


@dataclass
class ILoRAConfig(ReplayConfig):
    ema: float = option(0.99, "λ of the slow learner's moving average θ_slow <- λ θ_slow + (1 - λ) θ_fast, "
                              "after every optimizer step", low=0.0, high=1.0)
    consistency: float = option(1.0, "γ, the weight of the hidden-state consistency loss between the fast and "
                                     "the slow learner on the replayed examples", low=0.0)


class ILoRA(ReplayLoRA):
    __doc__ = __doc__
    name = "i-lora"
    title = "I-LoRA: Analyzing and Reducing Catastrophic Forgetting in Parameter-Efficient Tuning"
    paper = "2402.18865"
    config_cls = ILoRAConfig
    mechanism_metrics = {
        "buffer_examples": ReplayLoRA.mechanism_metrics["buffer_examples"],
        "ema_updates": "moving-average updates of the slow learner in the last stage (one per step)",
        "slow_fast_distance": "||θ_slow - θ_fast|| / ||θ_fast|| over the LoRA weights after the last step",
        "consistency_loss_mean": "mean of the consistency term over the last stage's steps (0 without a memory)",
    }

    def __init__(self, config=None):
        super().__init__(config)
        self.slow: dict[str, torch.Tensor] | None = None
        self._memory_rows = 0
        self._consistency: list[float] = []
        self._updates = 0

    # -- the two learners --------------------------------------------------------------------------------
    def _fast(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{n}.{p}": getattr(m, p) for n, m in self.lora_named(model) for p in ("lora_A", "lora_B")}

    @contextlib.contextmanager
    def _as_slow(self, model: nn.Module):
        """The model with the slow learner's LoRA weights in place of the fast one's."""
        fast = {k: v.detach().clone() for k, v in self._fast(model).items()}
        self.load_adapter_state(model, self.slow)
        try:
            yield model
        finally:
            self.load_adapter_state(model, fast)

    def on_train_begin(self, state: TrainState) -> None:
        if self.slow is None:  # the slow learner starts where the fast one does
            self.slow = {k: v.detach().clone() for k, v in self._fast(state.model).items()}
        self._consistency, self._updates = [], 0

    def stage_batches(self, stage: Stage, tokenizer, batch_size: int, seed: int):
        # replay-lora's batches put the memory's examples last: remember how many rows they are
        self._memory_rows = max(1, round(self.config.replay_fraction * batch_size)) if self.buffer else 0
        return super().stage_batches(stage, tokenizer, batch_size, seed)

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        k = self._memory_rows
        if not k or self.config.consistency == 0 or state.batch is None:
            return None
        ids = state.batch["input_ids"][-k:]
        mask = state.batch["attention_mask"][-k:]
        h_fast = state.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        with torch.no_grad():  # the slow learner's weights substituted functionally: the fast graph stays intact
            h_slow = torch.func.functional_call(state.model, self.slow, (), {
                "input_ids": ids, "attention_mask": mask, "output_hidden_states": True}).hidden_states[-1]
        keep = mask.bool()
        term = ((h_fast - h_slow) ** 2)[keep].sum(-1).mean()  # mean ||h_fast - h_slow||^2 over the positions
        self._consistency.append(float(term.detach()))
        return self.config.consistency * term

    @torch.no_grad()
    def on_step_end(self, state: TrainState) -> None:
        lam = self.config.ema
        for k, v in self._fast(state.model).items():
            self.slow[k].mul_(lam).add_(v.detach(), alpha=1.0 - lam)  # θ_slow <- λ θ_slow + (1 - λ) θ_fast
        self._updates += 1

    def on_train_end(self, state: TrainState) -> None:
        super().on_train_end(state)
        fast = self._fast(state.model)
        num = sum(float(((self.slow[k] - v.detach()) ** 2).sum()) for k, v in fast.items())
        den = sum(float((v.detach() ** 2).sum()) for v in fast.values())
        state.metrics["ema_updates"] = self._updates
        state.metrics["slow_fast_distance"] = round((num / den) ** 0.5 if den > 0 else 0.0, 8)
        c = self._consistency
        state.metrics["consistency_loss_mean"] = round(sum(c) / len(c), 8) if c else 0.0

    @contextlib.contextmanager
    def scoring(self, model: nn.Module, j: int, stage: Stage):
        with self._as_slow(model) as slow:  # the paper evaluates the slow learner
            yield slow

    def adapter_norm(self, model: nn.Module) -> float:
        with self._as_slow(model) as slow:  # the adapter that is scored
            return super().adapter_norm(slow)
