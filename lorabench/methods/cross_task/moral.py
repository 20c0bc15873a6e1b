"""MoRAL: MoE Augmented LoRA for LLMs' Lifelong Learning (Yang, Ali, Wang, Hu, Wang, arXiv 2402.11260).

MoRAL augments the frozen model's feed-forward layers with a mixture of LoRA experts and a router that sends each
token to its top-k experts (sec. 3 of the paper: the multi-task ability of MoE with LoRA's parameter efficiency),
fine-tuned on plain question-answer pairs rather than fact triplets, to keep learning new knowledge. On the shared
layer (lorabench/methods/cross_task/mixture.py) that is

    h = W0 x + Σ_{e in top-k(p)} (p_e / Σ_{top-k} p) s B_e A_e x,      p = softmax(W_r x)

in the FFN's linear layers only (Llama: mlp.gate_proj, up_proj, down_proj; BERT: the intermediate and output dense
layers of each block; `target_modules` overrides), attention left unadapted; top-2, no balancing loss by default
(the paper adds none that we know of; `balance` can add Switch's).

Its lifelong-learning protocol (5L-bench: question-answer pairs from arXiv papers newer than the model, scored
closed-book (the question alone) and open-book (the question with its source passage), and forgetting on a HotpotQA
hold-out) needs data that no asset carries (neither the arXiv QA pairs nor HotpotQA are on a reachable registry) and
free-text answers; what the assets allow is protocol (b) (lorabench/harness/mixture.py): multi-task training on QA
pool tasks scored per task, and the held-out tasks' accuracy against zero-shot as the forgetting side
(docs/cross-task.md).
"""
from __future__ import annotations

import re

from torch import nn

from lorabench.methods.base import ApplyContext
from lorabench.methods.cross_task.mixture import MixtureMethod, config_with

MoRALConfig = config_with("MoRALConfig", __name__, router="topk", top_k=2, balance="none")


def ffn_linears(model: nn.Module) -> list[str]:
    """The linear layers of the transformer blocks' feed-forward networks: Llama's mlp.*, BERT's intermediate.dense
    and the block's own output.dense (not the attention's output.dense)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (".mlp." in name or name.endswith(".intermediate.dense")
                                         or re.search(r"\.layer\.\d+\.output\.dense$", name)):
            out.append(name)
    return out


class MoRAL(MixtureMethod):
    __doc__ = __doc__
    name = "moral"
    title = "MoRAL: MoE augmented LoRA for LLMs' lifelong learning"
    paper = "2402.11260"
    config_cls = MoRALConfig

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        if self.config.target_modules is not None:
            return super().apply(model, ctx)
        names = ffn_linears(model)
        if not names:
            raise ValueError(f"moral puts its experts in the feed-forward layers; this {ctx.architecture} model has "
                             f"none it recognises (Llama mlp.*, BERT intermediate/output.dense): set target_modules")
        self.config.target_modules = names   # exact names: the FFN linears only
        try:
            return super().apply(model, ctx)
        finally:
            self.config.target_modules = None   # the record keeps the option as given
