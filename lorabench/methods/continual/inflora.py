"""InfLoRA: interference-free low-rank adaptation for continual learning (Liang & Li, arXiv 2404.00228).

InfLoRA writes each task's update as ΔW_t = A_t B_t with the input-side matrix B_t (r x k; our layer's
`lora_A`) *designed before the task trains and then frozen*, and only A_t (d x r; our `lora_B`, zero at
the start) trained. B_t's rows are chosen so that the update cannot interfere with past tasks: they lie
in the part of the current task's input space that is orthogonal to the subspace M (k x m, orthonormal)
spanned by the past tasks' inputs, where the gradients of the past tasks live (the paper's sec. 3.2-3.3):

    H̃_t = (I - M M^T) H_t,   B_t^T = the top-r eigenvectors of H̃_t H̃_t^T

with H_t the layer's inputs on the new task's training data (here their uncentred covariance H_t H_t^T,
accumulated over `design_batches` batches, padding positions left out). After the task, the task's
inputs extend M as in GPM (Saha et al., arXiv 2103.09762, sec. 4), which InfLoRA's DualGPM
maintains: add the top eigenvectors of (I - M M^T) H_t H_t^T (I - M M^T) until M captures a fraction
`epsilon` of the inputs' energy ||H_t||_F^2. (DualGPM switches to storing the orthogonal complement when
M grows past half the space: the same subspace, kept in fewer numbers; not needed at these sizes.)
The trained update is then folded into the frozen weights and the next task starts a new branch.

In a single-task trial the design runs once, at the first step, from that step's batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.continual.base import SequentialLoRA, Stage
from lorabench.methods.lora import LoraLinear
from lorabench.methods.lora.config import LoraConfig


@dataclass
class InfLoRAConfig(LoraConfig):
    epsilon: float = option(0.95, "GPM's energy threshold: the past-task subspace M captures this fraction of "
                                  "each finished task's input energy", low=0.0, high=1.0)
    design_batches: int = option(4, "training batches of the task whose layer inputs design the new B_t "
                                    "(and, after the task, extend M)", low=1)


class InfLoRA(SequentialLoRA):
    __doc__ = __doc__
    name = "inflora"
    title = "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning"
    paper = "2404.00228"
    config_cls = InfLoRAConfig
    default_lr = 1e-3
    mechanism_metrics = {
        "designed": "1 once B_t (our lora_A) has been designed from the task's inputs and frozen",
        "interference": "||B_t M||_F / ||B_t||_F over the layers: the new input directions' overlap with the "
                        "past tasks' subspace (0 = interference-free; 0 without past tasks)",
        "subspace_dim_mean": "mean over layers of dim M, the past tasks' input subspace",
        "designed_rank_mean": "mean over layers of the rows of B_t with a direction outside M (at most r; fewer once "
                              "M fills the input space, the other rows being 0)",
    }

    def __init__(self, config=None):
        super().__init__(config)
        self.M: dict[str, torch.Tensor] = {}  # layer name -> orthonormal basis (k x m) of past tasks' inputs
        self._designed = False
        self.designed_rank = 0.0

    def freeze_adapter(self, layer: LoraLinear) -> None:
        # B_t (our lora_A) is designed from data, never trained: a buffer, not a parameter; A_t (lora_B) trains
        a = layer.lora_A.detach().clone()
        del layer.lora_A
        layer.register_buffer("lora_A", a)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained tensors and every designed B_t (a buffer), which the update needs."""
        out = super().adapter_state_dict(model)
        for name, layer in self.lora_named(model):
            out[f"{name}.lora_A"] = layer.lora_A.detach()
        return out

    # -- the layers' inputs --------------------------------------------------------------------------
    @torch.no_grad()
    def input_covariance(self, model: nn.Module, batches) -> dict[str, torch.Tensor]:
        """H H^T (k x k) of every adapted layer's inputs over `batches`, padding positions left out."""
        cov: dict[str, torch.Tensor] = {}
        mask_box: list = [None]

        def hook(name):
            def f(mod, args, out):
                x = args[0].detach().float()
                m = mask_box[0]
                x = x[m] if m is not None and x.shape[:2] == m.shape else x.reshape(-1, x.shape[-1])
                c = x.T @ x
                cov[name] = cov[name] + c if name in cov else c
            return f

        handles = [layer.register_forward_hook(hook(n)) for n, layer in self.lora_named(model)]
        was = model.training
        model.eval()
        try:
            for batch in batches:
                mask_box[0] = batch["attention_mask"].bool() if "attention_mask" in batch else None
                model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
        finally:
            for h in handles:
                h.remove()
            model.train(was)
        return cov

    def _project(self, name: str, cov: torch.Tensor) -> torch.Tensor:
        m = self.M.get(name)
        if m is None or m.shape[1] == 0:
            return cov
        p = torch.eye(cov.shape[0], dtype=cov.dtype) - m @ m.T  # I - M M^T
        return p @ cov @ p

    @torch.no_grad()
    def design(self, model: nn.Module, batches) -> None:
        """B_t^T = top-r eigenvectors of (I - M M^T) H_t H_t^T (I - M M^T), per layer; B_t frozen, A_t = 0."""
        cov = self.input_covariance(model, batches)
        ranks = []
        for name, layer in self.lora_named(model):
            c = cov[name]
            vals, vecs = torch.linalg.eigh(self._project(name, c))  # ascending
            vals, vecs = vals.flip(0)[: layer.rank], vecs.flip(-1)[:, : layer.rank]
            # only directions the projection left energy in: once M fills most of the input space, fewer than
            # r remain, and an eigenvector of eigenvalue ~0 could lie in M (interfering); those rows stay 0
            keep = vals > 1e-6 * max(float(torch.trace(c)), 1e-30)
            top = torch.zeros(layer.rank, c.shape[0])
            top[keep] = vecs[:, keep].T                              # (r, k), orthonormal rows, B_t of the paper
            layer.lora_A.copy_(top.to(layer.lora_A.dtype))
            layer.lora_B.zero_()
            ranks.append(int(keep.sum()))
        self.designed_rank = sum(ranks) / len(ranks) if ranks else 0.0
        self._designed = True

    @torch.no_grad()
    def extend_subspace(self, model: nn.Module, batches) -> None:
        """GPM: add the top eigenvectors of the projected input covariance until M holds epsilon of its energy."""
        cov = self.input_covariance(model, batches)
        for name, _ in self.lora_named(model):
            c = cov[name]
            total = float(torch.trace(c))
            m = self.M.get(name, torch.zeros(c.shape[0], 0))
            held = float(torch.trace(m.T @ c @ m)) if m.shape[1] else 0.0
            vals, vecs = torch.linalg.eigh(self._project(name, c))
            vals, vecs = vals.flip(0).clamp(min=0), vecs.flip(-1)
            need = self.config.epsilon * total - held
            k = 0
            while need > 0 and k < len(vals) and vals[k] > 0:
                need -= float(vals[k])
                k += 1
            if k:
                new = torch.cat([m, vecs[:, :k]], dim=1)
                self.M[name] = torch.linalg.qr(new).Q  # re-orthonormalised against rounding
            else:
                self.M[name] = m

    def interference(self, model: nn.Module) -> float:
        num = den = 0.0
        for name, layer in self.lora_named(model):
            a = layer.lora_A.detach().float()
            den += float((a ** 2).sum())
            m = self.M.get(name)
            if m is not None and m.shape[1]:
                num += float(((a @ m) ** 2).sum())
        return (num / den) ** 0.5 if den > 0 else 0.0

    # -- the sequence scenario's hooks ----------------------------------------------------------------
    def _design_batches(self, stage: Stage):
        # a seed of its own: the design does not move the stage's training batches
        batches = stage.task.train_batches(stage.tokenizer, stage.batch_size, stage.seed * 1000 + stage.t + 500_000)
        return list(islice(batches, self.config.design_batches))

    def begin_task(self, model: nn.Module, stage: Stage) -> None:
        self.design(model, self._design_batches(stage))

    def end_task(self, model: nn.Module, stage: Stage) -> dict:
        metrics = {"interference": round(self.interference(model), 8)}
        self.fold_adapter(model)
        with torch.no_grad():
            for _, layer in self.lora_named(model):
                layer.lora_B.zero_()
        self.extend_subspace(model, self._design_batches(stage))
        dims = [m.shape[1] for m in self.M.values()]
        metrics["subspace_dim_mean"] = round(sum(dims) / len(dims), 3) if dims else 0.0
        self._designed = False
        return metrics

    # -- a single-task trial (and any stage the scenario did not design) --------------------------------
    def on_step_begin(self, state: TrainState) -> None:
        if not self._designed and state.batch is not None:
            self.design(state.model, [state.batch])

    def on_train_end(self, state: TrainState) -> None:
        state.metrics["designed"] = int(self._designed)
        state.metrics["designed_rank_mean"] = round(self.designed_rank, 3)
        state.metrics["interference"] = round(self.interference(state.model), 8)
        dims = [m.shape[1] for m in self.M.values()]
        state.metrics["subspace_dim_mean"] = round(sum(dims) / len(dims), 3) if dims else 0.0
