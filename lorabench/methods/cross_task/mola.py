"""Higher Layers Need More LoRA Experts (arXiv 2402.08562).

LoRA experts allocated by depth (Gao et al., arXiv 2402.08562): top-2 token routing with the Switch balancing
loss, and more experts in higher layers: MoLA-▽'s allocation, here [2, 4, 6, 8] experts for the four quarters of
the model's layers (lowest first; the paper's "2468" on 32 layers).
"""
from __future__ import annotations

from lorabench.methods.cross_task.mixture import MixtureMethod, config_with

# the paper's mechanism as MixtureConfig defaults
MoLAConfig = config_with("MoLAConfig", __name__,
                  router="topk", top_k=2, balance="switch", balance_weight=0.01, experts_by_depth=[2, 4, 6, 8])


class MoLA(MixtureMethod):
    __doc__ = __doc__
    name = "mola"
    title = "MoLA: Higher Layers Need More LoRA Experts"
    paper = "2402.08562"
    config_cls = MoLAConfig
