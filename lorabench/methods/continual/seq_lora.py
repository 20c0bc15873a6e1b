"""Sequential LoRA: one LoRA adapter fine-tuned on each task of the sequence in turn, nothing done
against forgetting: the reference every continual method is compared with (GEM's "single" predictor,
Lopez-Paz & Ranzato, arXiv 1706.08840). The machinery every continual method shares is in
`lorabench/methods/continual/base.py`."""
from __future__ import annotations

from lorabench.methods.continual.base import SequentialLoRA


class SeqLoRA(SequentialLoRA):
    __doc__ = __doc__
    name = "seq-lora"
