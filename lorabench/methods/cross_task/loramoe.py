"""LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via MoE-Style Plugin (arXiv 2312.09979).

A dense softmax router over LoRA experts with the localized balancing constraint (Dou et al., arXiv 2312.09979):
output W0 x + Σ_e ω_e(x) s B_e A_e x with ω = softmax(W_r x) (its eq. (5)); the experts are split into a
world-knowledge group and a downstream-task group, and L_lbc = σ²(Z)/μ(Z), Z = I ∘ Q (Q the experts' importance
per sample, I = 1+δ for an expert of the sample's type, 1-δ otherwise: its eq. (7)-(9)), weight β = 0.1, δ = 0.1.
A sample's type is "world knowledge" when its task id is in the scenario's knowledge tasks, else "downstream".
"""
from __future__ import annotations

from lorabench.methods.cross_task.mixture import MixtureMethod, config_with

# the paper's mechanism as MixtureConfig defaults
LoRAMoEConfig = config_with("LoRAMoEConfig", __name__,
                  router="softmax", balance="lbc", balance_weight=0.1, lbc_delta=0.1)


class LoRAMoE(MixtureMethod):
    __doc__ = __doc__
    name = "loramoe"
    title = "LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via MoE-Style Plugin"
    paper = "2312.09979"
    config_cls = LoRAMoEConfig
