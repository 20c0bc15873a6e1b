"""MultiLoRA: Democratizing LoRA for Better Multi-Task Learning (arXiv 2311.11501).

Horizontal scaling of LoRA (Wang et al., arXiv 2311.11501): E parallel LoRA modules of rank r/E each, summed
with one learnt scaling factor per module (ΔW = Σ_e s_e B_e A_e, s_e initialised at 1), no router: the update's
singular spectrum is spread over the modules instead of a few top directions.
"""
from __future__ import annotations

from lorabench.methods.cross_task.mixture import MixtureMethod, config_with

# the paper's mechanism as MixtureConfig defaults
MultiLoRAConfig = config_with("MultiLoRAConfig", __name__,
                  router="static")


class MultiLoRA(MixtureMethod):
    __doc__ = __doc__
    name = "multilora"
    title = "MultiLoRA: Democratizing LoRA for Better Multi-Task Learning"
    paper = "2311.11501"
    config_cls = MultiLoRAConfig
