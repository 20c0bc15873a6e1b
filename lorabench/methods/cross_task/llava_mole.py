"""LLaVA-MoLE: Sparse Mixture of LoRA Experts for Mitigating Data Conflicts in Instruction Finetuning MLLMs (arXiv 2401.16160).

Top-1 token routing of LoRA experts (Chen et al., arXiv 2401.16160): each token goes to one expert, weighted by
its router probability (Switch's top-1, so the router keeps a gradient), with the load-balancing loss. The paper
routes tokens of a multimodal model; here the tokens of the text pool.
"""
from __future__ import annotations

from lorabench.methods.cross_task.mixture import MixtureMethod, config_with

# the paper's mechanism as MixtureConfig defaults
LLaVAMoLEConfig = config_with("LLaVAMoLEConfig", __name__,
                  router="topk", top_k=1, renormalize=False, balance="switch", balance_weight=0.01)


class LLaVAMoLE(MixtureMethod):
    __doc__ = __doc__
    name = "llava-mole"
    title = "LLaVA-MoLE: Sparse Mixture of LoRA Experts for Mitigating Data Conflicts in Instruction Finetuning MLLMs"
    paper = "2401.16160"
    config_cls = LLaVAMoLEConfig
