"""SiRA: Sparse Mixture of Low Rank Adaptation (arXiv 2311.09179).

Sparse top-k routing of LoRA experts with an expert capacity and expert dropout (Zhu et al., arXiv 2311.09179):
top-2 of softmax(W_r x); each expert takes at most C = ceil(capacity_factor * k * N / E) of a batch's N tokens, in
token order (the rest skip it, GShard's capacity); dropout on the gate values while training (its "expert
dropout", against over-fitting). capacity_factor 1.0 and expert dropout 0.2 are lorabench's defaults.
"""
from __future__ import annotations

from lorabench.methods.cross_task.mixture import MixtureMethod, config_with

# the paper's mechanism as MixtureConfig defaults
SiRAConfig = config_with("SiRAConfig", __name__,
                  router="topk", top_k=2, capacity_factor=1.0, expert_dropout=0.2)


class SiRA(MixtureMethod):
    __doc__ = __doc__
    name = "sira"
    title = "SiRA: Sparse Mixture of Low Rank Adaptation"
    paper = "2311.09179"
    config_cls = SiRAConfig
