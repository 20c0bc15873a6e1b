"""Task arithmetic with LoRA for continual learning (Chitale et al., arXiv 2311.02428).

Each task trains its own LoRA adapter from the pretrained weights, independently of the others; its
update ΔW_t = s B_t A_t is the task's vector. After task t the task vectors seen so far are merged by
task arithmetic (Ilharco et al., arXiv 2212.04089):

    W = W0 + λ Σ_{s<=t} ΔW_s                      (λ = `merge_scale`)

and the merged model is then fine-tuned for `memory_steps` steps on a small memory of `buffer_per_task`
training examples of every task seen (replay-lora's memory), with a fresh LoRA adapter on top of the merged
weights. That model scores every task (no task identity at test time). Before the next task trains, the
merged sum is taken off the weights again (W0 restored up to float rounding) and a fresh adapter starts
from the pretrained model, so every task vector is trained alone, as the paper's are. λ is a weight to
choose on validation (one suite label per value, as O-LoRA's λ1).

A single-task trial has no merge: it is LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.continual.base import SequentialLoRA, Stage, mixed_batches
from lorabench.methods.continual.replay_lora import ReplayConfig, ReplayLoRA


@dataclass
class TaskArithmeticConfig(ReplayConfig):
    merge_scale: float = option(1.0, "λ of W0 + λ Σ_s ΔW_s, the task vectors' merge (task arithmetic's scaling "
                                     "coefficient; choose it on validation)", low=0.0)
    memory_steps: int = option(10, "steps of fine-tuning the merged model on the memory after each task "
                                   "(0: the merge alone)", low=0)


class _Memory:
    """The memory as a task the training loop can draw batches from."""
    name = "memory"

    def __init__(self, buffer):
        self.buffer = buffer

    def train_batches(self, tokenizer, batch_size: int, seed: int):
        return mixed_batches([(self.buffer, batch_size)], tokenizer, seed)


class TaskArithmetic(ReplayLoRA):
    __doc__ = __doc__
    name = "task-arithmetic"
    title = "Task Arithmetic with LoRA for Continual Learning"
    paper = "2311.02428"
    config_cls = TaskArithmeticConfig
    mechanism_metrics = {
        "buffer_examples": ReplayLoRA.mechanism_metrics["buffer_examples"],
        "task_vectors_merged": "task vectors in the merged model after the last stage (0 in a single-task trial)",
        "memory_loss_last": "the last loss of the memory fine-tuning after the last stage (None without it)",
    }

    def __init__(self, config=None):
        super().__init__(config)
        self.vectors: list[dict[str, torch.Tensor]] = []  # each task's adapter (A, B) as trained
        self.merged = False

    def stage_batches(self, stage: Stage, tokenizer, batch_size: int, seed: int):
        return SequentialLoRA.stage_batches(self, stage, tokenizer, batch_size, seed)  # each task alone

    def on_train_end(self, state) -> None:
        super().on_train_end(state)
        state.metrics.setdefault("task_vectors_merged", len(self.vectors) if self.merged else 0)
        state.metrics.setdefault("memory_loss_last", None)

    @torch.no_grad()
    def _add_merge(self, model: nn.Module, sign: float) -> None:
        """W <- W + sign λ Σ_s s B_s A_s over the stored task vectors, in a fixed order (so -1 undoes +1)."""
        lam = self.config.merge_scale
        for name, layer in self.lora_named(model):
            total = torch.zeros_like(layer.base.weight, dtype=torch.float32)
            for vec in self.vectors:
                total += layer.scale * (vec[f"{name}.lora_B"].float() @ vec[f"{name}.lora_A"].float())  # ΔW_s
            layer.base.weight += (sign * lam * total).to(layer.base.weight.dtype)

    def begin_task(self, model: nn.Module, stage: Stage) -> None:
        if self.merged:  # back to the pretrained weights: the next task vector is trained from W0
            self._add_merge(model, -1.0)
            self.merged = False
        if stage.t > 0:
            self.reset_adapter(model, stage.seed * 1000 + stage.t)

    def end_task(self, model: nn.Module, stage: Stage) -> dict:
        metrics = super().end_task(model, stage)  # the memory gains this task's examples
        self.vectors.append(self.adapter_state(model))
        self._add_merge(model, +1.0)               # W0 + λ Σ_{s<=t} ΔW_s
        self.merged = True
        self.reset_adapter(model, stage.seed * 1000 + stage.t + 100_000)  # a fresh adapter on the merged model
        metrics["task_vectors_merged"] = len(self.vectors)
        metrics["memory_loss_last"] = None
        if self.config.memory_steps > 0:
            from lorabench.harness.train import TrainConfig, train
            cfg = TrainConfig(steps=self.config.memory_steps, batch_size=stage.batch_size, lr=stage.lr,
                              warmup_ratio=0.0, schedule="constant", warmup_steps_for_throughput=0)
            result = train(model, SequentialLoRA(self.config), _Memory(self.buffer), stage.tokenizer, cfg,
                           seed=stage.seed * 1000 + stage.t + 200_000, progress=False)
            metrics["memory_loss_last"] = None if result.final_loss is None else round(result.final_loss, 6)
        return metrics
