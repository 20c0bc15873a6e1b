"""Octavius: Mitigating Task Interference in MLLMs via LoRA-MoE (arXiv 2311.02684).

Instance-level routing of LoRA experts (Chen et al., arXiv 2311.02684): one sparse top-2 gate per example,
computed from the example as a whole (the paper: from the instruction's embedding; here each layer's router reads
the mean of the example's non-pad token inputs), used for every token of the example.
"""
from __future__ import annotations

from lorabench.methods.cross_task.mixture import MixtureMethod, config_with

# the paper's mechanism as MixtureConfig defaults
OctaviusConfig = config_with("OctaviusConfig", __name__,
                  router="topk", top_k=2, level="sequence")


class Octavius(MixtureMethod):
    __doc__ = __doc__
    name = "octavius"
    title = "Octavius: Mitigating Task Interference in MLLMs via LoRA-MoE"
    paper = "2311.02684"
    config_cls = OctaviusConfig
