"""MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of Experts (arXiv 2404.15159).

A top-k token router over LoRA experts with Switch's load-balancing loss (Li et al., arXiv 2404.15159):
gate = the top-2 of softmax(W_r x), renormalised (its eq. (3), Mixtral's router); auxiliary loss
a E Σ_e f_e P_e with a = 0.01 (its eq. (6)). The paper puts the experts in the FFN and gives attention plain
LoRA; here the experts sit in every adapted linear (target_modules selects). Note: the survey's "MixLoRA" entry
is another paper of the same name (Shen et al., arXiv 2402.15896, conditional selection of rank-1 factors),
which stays planned in docs/methods.md.
"""
from __future__ import annotations

from lorabench.methods.cross_task.mixture import MixtureMethod, config_with

# the paper's mechanism as MixtureConfig defaults
MixLoRAConfig = config_with("MixLoRAConfig", __name__,
                  router="topk", top_k=2, balance="switch", balance_weight=0.01)


class MixLoRA(MixtureMethod):
    __doc__ = __doc__
    name = "mixlora"
    title = "MixLoRA (Li et al.): Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of Experts"
    paper = "2404.15159"
    config_cls = MixLoRAConfig
