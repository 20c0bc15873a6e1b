"""GS-LoRA: continual forgetting with group-sparse LoRA (Zhao et al., "Continual Forgetting for Pre-trained Vision
Models", arXiv 2403.11530).

A model that already knows every class must forget chosen classes, task after task, while keeping the rest.
GS-LoRA adds a LoRA adapter to the feed-forward layers of every transformer block; the adapters of one block
form one group θ_g (the A and B of its FFN layers: BERT's intermediate and output dense, Llama's gate/up/down
projections). Each forgetting task trains a fresh set of groups, the head frozen, on

    L = L_retain + β · ReLU(BND − L_forget) + α · Σ_g ||θ_g||_2

- L_retain: the cross-entropy on a batch of the classes kept (the training loop's own loss);
- ReLU(BND − L_forget): the bounded forgetting loss: the cross-entropy on a batch of the classes to forget is
  pushed up until it reaches the bound BND, then left alone (the paper's bounded loss; unbounded, maximising a
  cross-entropy diverges);
- α Σ_g ||θ_g||_2: the group lasso over the blocks (the paper's group sparse regularisation; the authors' code,
  `get_structure_loss`, sums each group's sqrt(Σ θ²) over its FFN LoRA tensors), which drives whole groups to
  zero, so that only a few blocks are edited.

The group lasso is optimised either through its gradient in the loss, as the authors' code does (`proximal:
false`; AdamW then leaves groups small but not zero), or by its proximal step after each optimizer step
(`proximal: true`, the default): θ_g <- max(0, 1 − η α / ||θ_g||_2) θ_g with η the learning rate of the optimizer
step just taken (proximal gradient descent, θ <- prox_{ηαΩ}(θ − η∇L): the same η in both halves; read before the
scheduler moves it, so the last step of a linear decay shrinks by its own η, not by the next step's 0), the group
soft-thresholding that sets a group exactly to zero (Yuan & Lin's group lasso; the usual way to get the sparsity
the paper counts). A group the step zeroes stays zero: its optimizer state (Adam's moments) is zeroed with it, and
at A = B = 0 the loss's gradient with respect to A (Bᵀ·) and to B (·Aᵀ) is exactly zero, so AdamW leaves it there
(without that, the moments of the steps before revived the group at the next step, and no group read zero at the
end of a run: issue 18's review). The authors' code counts nothing (it logs each group's norm, util/cal_norm.py
`get_norm_of_lora`); here a group counts as zero when its norm is at most `zero_tol`. After each task the groups are
folded into the frozen weights and the next task starts fresh ones, as the paper adds a new LoRA group set per task.

The protocol (the forgetting scenario, lorabench/harness/forgetting.py; docs/continual.md) measures the accuracy
on the classes forgotten and on the classes kept, the H-mean of the paper, 2 · Drop_f · Acc_r / (Drop_f + Acc_r)
with Drop_f the fall of the forget classes' accuracy, and the number of blocks whose group is zero. As a
single-task trial (the smoke suite) it trains its FFN groups on the task with the group lasso and no forget set.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState, replace_module, resolve_targets
from lorabench.methods.continual.base import SequentialLoRA
from lorabench.methods.lora.config import LoraConfig
from lorabench.methods.lora.layer import LoraLinear

# The feed-forward linear layers of a transformer block, and the block index in a module name.
FFN = re.compile(r"(\.intermediate\.dense|\.layer\.\d+\.output\.dense|\.mlp\.(gate_proj|up_proj|down_proj))$")
BLOCK = re.compile(r"\.(?:layer|layers|h)\.(\d+)\.")


@dataclass
class GSLoRAConfig(LoraConfig):
    target_modules: list[str] | None = option(None, "names (or name suffixes) of the modules to adapt; None = the "
                                                    "feed-forward layers of every transformer block (the paper's groups)")
    group_alpha: float = option(1e-3, "α, the weight of the group lasso Σ_g ||θ_g||_2 over the blocks' LoRA groups "
                                      "(larger: more blocks' groups go to zero)", low=0.0)
    forget_beta: float = option(0.2, "β, the weight of the bounded forgetting loss ReLU(BND − L_forget)", low=0.0)
    bound: float = option(4.0, "BND: the forget classes' cross-entropy is pushed up to this value and no further "
                               "(ln 4 = 1.39 is chance on 4 classes)", low=0.0)
    proximal: bool = option(True, "optimise the group lasso by its proximal step after each optimizer step (groups "
                                  "become exactly zero); false: through its gradient in the loss, as the authors' code")
    zero_tol: float = option(1e-6, "a group counts as zeroed when ||θ_g||_2 is at most this", low=0.0)


class GSLoRA(SequentialLoRA):
    __doc__ = __doc__
    name = "gs-lora"
    title = "Continual Forgetting for Pre-trained Vision Models (GS-LoRA)"
    paper = "2403.11530"
    config_cls = GSLoRAConfig
    mechanism_metrics = {
        "groups": "blocks with a LoRA group (the FFN layers of each transformer block)",
        "zero_groups": "groups whose norm ||θ_g||_2 is at most zero_tol after training (blocks left unedited)",
        "group_norms": "||θ_g||_2 of each block's group after training, in block order",
        "structure_loss_last": "Σ_g ||θ_g||_2 at the last step",
    }
    # In the forgetting protocol (harness/forgetting.py) the record also carries forget_ce_last, the forget
    # batch's cross-entropy at the last step (pushed up to the bound); a single-task trial has no forget set.

    def __init__(self, config=None):
        super().__init__(config)
        self.forget_batches: Iterator[dict] | None = None  # set by the forgetting scenario for each task
        self.active = True  # False while the scenario trains the model that will forget (no GS-LoRA terms)

    # -- where the adapters go ----------------------------------------------------------------------
    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        """LoRA on the feed-forward layers of every block (or on target_modules when given)."""
        names = resolve_targets(model, self.config.target_modules, ctx)
        if self.config.target_modules is None:
            names = [n for n in names if FFN.search(n) and BLOCK.search(n)]
            if not names:
                raise ValueError(f"gs-lora: no feed-forward layer of a transformer block found in this "
                                 f"{ctx.architecture} model (BERT's intermediate/output dense, Llama's mlp "
                                 f"projections); set target_modules")
        self.freeze_all_but_head(model, ctx)
        for name in names:
            replace_module(model, name, self.make_layer(model.get_submodule(name)))
        return model

    def groups(self, model: nn.Module) -> dict[int, list[LoraLinear]]:
        """Block index -> the LoRA layers of that block (one group θ_g each)."""
        out: dict[int, list[LoraLinear]] = {}
        for name, layer in self.lora_named(model):
            m = BLOCK.search("." + name)
            assert m, f"gs-lora: adapted layer {name} is in no numbered block"
            out.setdefault(int(m.group(1)), []).append(layer)
        return dict(sorted(out.items()))

    @staticmethod
    def group_norm(layers: list[LoraLinear]) -> torch.Tensor:
        """||θ_g||_2 = sqrt(Σ over the group's A and B of Σ θ²): one term of the group lasso."""
        return torch.sqrt(sum((p ** 2).sum() for layer in layers for p in (layer.lora_A, layer.lora_B)))

    def group_norms(self, model: nn.Module) -> list[float]:
        with torch.no_grad():
            return [float(self.group_norm(g)) for g in self.groups(model).values()]

    # -- training hooks -----------------------------------------------------------------------------
    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        if not self.active:
            return None
        c, loss = self.config, None
        if self.forget_batches is not None and c.forget_beta > 0:
            ce_f = state.model(**next(self.forget_batches)).loss              # L_forget on the classes to forget
            state.metrics["forget_ce_last"] = round(float(ce_f.detach()), 6)
            loss = c.forget_beta * torch.relu(c.bound - ce_f)                   # β · ReLU(BND − L_forget)
        if c.group_alpha > 0 and not c.proximal:
            lasso = sum(self.group_norm(g) for g in self.groups(state.model).values())
            loss = c.group_alpha * lasso if loss is None else loss + c.group_alpha * lasso  # α Σ_g ||θ_g||_2
        return loss

    def on_step_begin(self, state: TrainState) -> None:
        self._eta = state.optimizer.param_groups[0]["lr"]   # η of this step's update (the scheduler moves it after)

    @torch.no_grad()
    def on_step_end(self, state: TrainState) -> None:
        c = self.config
        if not self.active or c.group_alpha <= 0 or not c.proximal:
            return
        eta = getattr(self, "_eta", state.optimizer.param_groups[0]["lr"])   # the step just taken's η
        for layers in self.groups(state.model).values():
            norm = float(self.group_norm(layers))
            shrink = max(0.0, 1.0 - eta * c.group_alpha / norm) if norm > 0 else 0.0  # prox of η α ||θ_g||_2
            for layer in layers:
                for p in (layer.lora_A, layer.lora_B):
                    p.mul_(shrink)
                    if shrink == 0.0:   # zeroed: its moments too, so that it stays zero (zero gradient at A = B = 0)
                        for v in state.optimizer.state.get(p, {}).values():
                            if torch.is_tensor(v) and v.shape == p.shape:
                                v.zero_()

    def on_train_end(self, state: TrainState) -> None:
        if not self.active:
            return
        norms = self.group_norms(state.model)
        state.metrics["groups"] = len(norms)
        state.metrics["group_norms"] = [round(x, 6) for x in norms]
        state.metrics["zero_groups"] = sum(x <= self.config.zero_tol for x in norms)
        state.metrics["structure_loss_last"] = round(sum(norms), 6)

    # -- the forgetting scenario's hooks --------------------------------------------------------------
    def begin_learning(self, model: nn.Module) -> None:
        """Before the model that will forget is trained: every weight trains (full fine-tuning of the backbone,
        the groups and the head), GS-LoRA's terms off: the paper starts from a fully trained model."""
        self.active = False
        self._frozen = [p for p in model.parameters() if not p.requires_grad]
        for p in self._frozen:
            p.requires_grad_(True)

    def end_learning(self, model: nn.Module) -> None:
        """The backbone frozen again and the groups folded into it."""
        for p in self._frozen:
            p.requires_grad_(False)
        self.fold_groups(model)

    def begin_forgetting(self, model: nn.Module, head_modules: list[str], forget_batches: Iterator[dict],
                         seed: int) -> None:
        """Before a forgetting task: fresh groups (A random, B = 0), the head frozen (the model that forgets is
        given; only the groups train), and the stream of forget-class batches L_forget is computed on."""
        self.active = True
        self.reset_adapter(model, seed)
        for h in head_modules:
            for p in model.get_submodule(h).parameters():
                p.requires_grad_(False)
        self.forget_batches = forget_batches

    @torch.no_grad()
    def fold_groups(self, model: nn.Module) -> None:
        """After training (the model that will forget, or a forgetting task): the groups become part of the
        frozen weights (W0 + s B A), and B is zeroed so that the next fresh groups start from the edited model."""
        self.fold_adapter(model)
        for _, layer in self.lora_named(model):
            layer.lora_B.zero_()
        self.forget_batches = None
