"""MTLoRA: A Low-Rank Adaptation Approach for Efficient Multi-Task Learning (arXiv 2403.20320).

Task-agnostic and task-specific low-rank modules (Agiza et al., arXiv 2403.20320, sec. 3): every adapted layer has a
shared, task-agnostic LoRA that every example uses and one task-specific LoRA per task, used only by that task's
examples: h = W0 x + s B_0 A_0 x + s B_t A_t x for an example of task t. The paper builds them into a hierarchical
vision transformer with a multi-scale fusion of the task-specific features; here they sit in every adapted linear of
the text model, and the task is the example's task id (protocol (b)). A task the mixture never trained on uses the
shared module alone. Set `experts` to shared_experts + the number of training tasks.
"""
from __future__ import annotations

from lorabench.methods.cross_task.mixture import MixtureMethod, config_with

# the paper's mechanism as MixtureConfig defaults (7 experts: one shared + six tasks, suites/mixture.yaml's split)
MTLoRAConfig = config_with("MTLoRAConfig", __name__, router="task-specific", shared_experts=1, experts=7, rank=2)


class MTLoRA(MixtureMethod):
    __doc__ = __doc__
    name = "mtlora"
    title = "MTLoRA: Low-rank adaptation approach for efficient multi-task learning"
    paper = "2403.20320"
    config_cls = MTLoRAConfig
