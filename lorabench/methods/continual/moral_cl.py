"""MoRAL in the lifelong setting (Yang, Ali, Wang, Hu, Wang, "MoRAL: MoE Augmented LoRA for LLMs' Lifelong Learning",
arXiv 2402.11260): its mixture of LoRA experts trained on the tasks of a sequence one after another.

The layer is `moral`'s (lorabench/methods/cross_task/moral.py, on the shared mixture layer
lorabench/methods/cross_task/mixture.py): E LoRA experts on each linear of the frozen model's feed-forward
networks, attention left unadapted, and a router that sends each token to its top-k experts,

    h = W0 x + Σ_{e in top-k(p)} (p_e / Σ_{top-k} p) s B_e A_e x,      p = softmax(W_r x)        (top-2 by default)

What the paper's lifelong part says is trained when (as far as its abstract and sec. 3 describe it): the base
model stays frozen and the experts and the router are fine-tuned together on the question-answer pairs that
carry the new knowledge; nothing in it freezes experts or adds new ones when new knowledge arrives, and its
forgetting is read on held-out data the mixture was not trained on. So here, in the sequence scenario
(lorabench/harness/sequence.py), one mixture is trained on task after task: at every stage all E experts and the
router train (a fresh AdamW per stage, as for every continual method), nothing is reset, frozen, folded or added,
and every task is scored after every stage with the same model (the task identity is never given). What keeps an
earlier task is the routing itself: tokens of different tasks may go to different experts, so training on a new
task moves mostly the experts its tokens are routed to. The reference is `seq-lora` (one LoRA through the
sequence); the difference is only the mixture and its router.

The mechanism, recorded per stage (each stage's `method_metrics` in the record's `continual.stages`):
- while the stage trains: each expert's share of the gate mass (`expert_load`), its imbalance (`load_cv`) and
  the router's entropy (`router_entropy`), as `moral`'s;
- `expert_update`: per expert, how far the stage moved its update, sqrt(Σ_layers ||ΔW_e(after) - ΔW_e(before)||_F^2)
  with ΔW_e = s B_e A_e: which experts the stage's task was written into;
- `task_routing`: after the stage, every task's routing on its eval examples (expert load, router entropy,
  load_cv), read while that task is scored: whether the tasks are routed apart, and how an earlier task's
  routing drifts as later tasks train the router.
The adapter norm after each stage is sqrt(Σ_layers Σ_e ||s B_e A_e||_F^2), every expert's update together
(the update the model applies to a token is the gate-weighted sum of some of them).

Not reproduced: the paper's 5L-bench protocol (question-answer pairs extracted from arXiv papers newer than the
model, scored as free text closed-book and open-book with its RA/RR/Faith/Filter/QR measures, forgetting as
the drop on a HotpotQA hold-out). No asset carries those QA pairs or HotpotQA, and the sequence scenario scores
multiple-choice tasks by option likelihood; here the stages are the pool's multiple-choice tasks and forgetting is
GEM's BWT over them (docs/continual.md). The paper's number of experts and rank are not used either: the
defaults are `moral`'s (4 experts of rank 4, top-2).

In a single-task trial (a sequence of one task) this is `moral` with `expert_update` recorded; `task_routing`
is None there (no sequence scores the tasks).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from lorabench.methods.base import TrainState
from lorabench.methods.continual.base import Stage, StageHooks
from lorabench.methods.cross_task.mixture import MixtureLinear
from lorabench.methods.cross_task.moral import MoRAL


def expert_updates(layer: MixtureLinear, lora_A: torch.Tensor | None = None,
                   lora_B: torch.Tensor | None = None) -> list[torch.Tensor]:
    """ΔW_e = s (B_e * rank mask) A_e (d, k) of each expert e of `layer`, from its current weights or from
    the given (A, B) (a snapshot)."""
    A = layer.lora_A.detach() if lora_A is None else lora_A
    B = layer.lora_B.detach() if lora_B is None else lora_B
    out = []
    for e in range(layer.E):
        sl = slice(e * layer.r, (e + 1) * layer.r)
        out.append(layer.scale * (B[:, sl].float() * layer.rank_mask[sl].float()) @ A[sl].float())
    return out


class MoRALCL(StageHooks, MoRAL):
    __doc__ = __doc__
    name = "moral-cl"
    title = "MoRAL: MoE augmented LoRA for LLMs' lifelong learning (one mixture trained task after task)"
    paper = "2402.11260"
    family = "continual"
    mechanism_metrics = {
        **MoRAL.mechanism_metrics,
        "expert_update": "per expert, how far the stage's training moved its update: sqrt(Σ_layers "
                         "||ΔW_e(after) - ΔW_e(before)||_F^2), ΔW_e = s B_e A_e (experts of layers with fewer "
                         "experts padded with nothing)",
        "task_routing": "after each stage, per task: the expert load, load_cv and router entropy on its eval "
                        "examples while it is scored (None in a single-task trial)",
    }

    def __init__(self, config=None):
        super().__init__(config)
        self._before: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._task_routing: dict[str, dict] = {}

    # -- training: the experts' updates before and after -------------------------------------------------
    def on_train_begin(self, state: TrainState) -> None:
        super().on_train_begin(state)
        self._before = {id(m): (m.lora_A.detach().clone(), m.lora_B.detach().clone())
                        for m in self.mixture_layers(state.model)}

    def on_train_end(self, state: TrainState) -> None:
        super().on_train_end(state)   # expert_load, load_cv, router_entropy of this stage's training
        layers = self.mixture_layers(state.model)
        E = max(m.E for m in layers)
        sq = [0.0] * E
        with torch.no_grad():
            for m in layers:
                before = expert_updates(m, *self._before[id(m)])
                for e, (now, was) in enumerate(zip(expert_updates(m), before)):
                    sq[e] += float(torch.linalg.matrix_norm(now - was) ** 2)
        state.metrics["expert_update"] = [round(x ** 0.5, 6) for x in sq]
        state.metrics.setdefault("task_routing", None)   # filled by the sequence scenario's scoring
        self._before = {}

    # -- the sequence: every task scored with the one mixture, its routing read meanwhile ------------------
    @contextlib.contextmanager
    def scoring(self, model: nn.Module, j: int, stage: Stage):
        for m in self.mixture_layers(model):
            m.reset_stats()
        yield model
        routing = self.router_metrics(model, reset=True)   # the tokens of task j's eval examples only
        self._task_routing[stage.tasks[j].name] = {k: routing.get(k) for k in ("expert_load", "load_cv",
                                                                                "router_entropy")}

    def stage_scored(self, model: nn.Module, stage: Stage) -> dict:
        routing, self._task_routing = self._task_routing, {}
        return {"task_routing": routing}

    @torch.no_grad()
    def adapter_norm(self, model: nn.Module) -> float:
        """sqrt(Σ_layers Σ_e ||s B_e A_e||_F^2): every expert's update together."""
        total = 0.0
        for m in self.mixture_layers(model):
            total += sum(float(torch.linalg.matrix_norm(d) ** 2) for d in expert_updates(m))
        return total ** 0.5
