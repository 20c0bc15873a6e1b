"""MOELoRA: An MoE-based Parameter Efficient Fine-Tuning Method for Multi-task Medical Applications (arXiv 2310.18339).

LoRA experts gated by a task-motivated gate (Liu et al., arXiv 2310.18339): each layer's output is
W0 x + Σ_e ω_e s B_e A_e x with ω = softmax(W_t E_t[task]) (its eq. (6)), E_t a learnt task embedding: the gate
depends on the example's task id only, not on its tokens. For a task never trained on, the gate is the mean of
the trained tasks' gates.
"""
from __future__ import annotations

from lorabench.methods.cross_task.mixture import MixtureMethod, config_with


MOELoRAConfig = config_with("MOELoRAConfig", __name__, router="task")  # the paper's mechanism as MixtureConfig defaults


class MOELoRA(MixtureMethod):
    __doc__ = __doc__
    name = "moelora"
    title = "MOELoRA: An MoE-based Parameter Efficient Fine-Tuning Method for Multi-task Medical Applications"
    paper = "2310.18339"
    config_cls = MOELoRAConfig
