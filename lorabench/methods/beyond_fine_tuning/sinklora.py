"""SinkLoRA (arXiv 2406.05678): LongLoRA (`longlora.py`) with SF-Attn in place of S²-Attn.

SF-Attn = segmentation and reassembly of the shifted groups, plus global attention of `n_sink` sink
tokens (sec. 3); both patterns live in `attention.py`. SinkLoRA's inference-time H2O KV-cache
compression (its sec. 4) is not implemented: evaluation uses the full attention and the full cache,
as LongLoRA's. It records the same `method_metrics` as LongLoRA.
"""
from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import option
from lorabench.methods.beyond_fine_tuning.longlora import LongLoRA, LongLoRAConfig


@dataclass
class SinkLoRAConfig(LongLoRAConfig):
    n_sink: int = option(
        4, "number of sink attention tokens (the first tokens of the sequence) with global attention in "
           "SF-Attn: every token attends to them and they to every token (0 = no sinks)", low=0, high=4096)


class SinkLoRA(LongLoRA):
    name = "sinklora"
    title = "SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large Language Models"
    paper = "2406.05678"
    config_cls = SinkLoRAConfig

    wrap = False       # SF-Attn's segmentation and reassembly: shifted groups do not wrap around

    def n_sink(self) -> int:
        return self.config.n_sink


__all__ = ["SinkLoRA", "SinkLoRAConfig"]
