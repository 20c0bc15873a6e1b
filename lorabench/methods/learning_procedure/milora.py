"""MiLoRA (arXiv 2406.09044): PiSSA's SVD initialisation (`pissa.py`) from the r *minor* singular
components (smallest singular values; sec. 3 of MiLoRA), so that fine-tuning moves in directions
that least disturb the pretrained knowledge.
"""
from __future__ import annotations

from lorabench.methods.learning_procedure.pissa import PiSSA, SvdInitVariant
from lorabench.methods.lora import LoraVariant


class MiLoRA(PiSSA):
    name = "milora"
    title = "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM Finetuning"
    paper = "2406.09044"
    default_lr = 5e-4

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.svd != "full":
            raise ValueError("milora needs svd='full': a randomised low-rank SVD does not find the minor components")

    def variant(self) -> LoraVariant:
        return SvdInitVariant(minor=True)
