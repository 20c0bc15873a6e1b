"""CoLA: Chain of LoRA, fine-tuning via residual learning (Xia, Qin, Hazan, arXiv 2401.04151).

Training is split into `chain_length` phases. At the end of each phase the current LoRA is
"tied" into the weight (W <- W + s B A, Algorithm 1 "tie a knot"), a new LoRA starts from a fresh
init (B = 0) and its optimizer state starts empty: W = W0 + sum_j s B_j A_j, a chain of residual
low-rank updates.
"""
from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.low_rank_bottleneck.layer import HighRankLoRA, high_rank_layers, reset_optimizer_state
from lorabench.methods.lora import LoRA, LoraConfig


@dataclass
class ColaConfig(LoraConfig):
    chain_length: int = option(3, "number of LoRA links M in the chain; the training steps are split evenly "
                                  "between them (the paper uses 1-3 knots per epoch)", low=1)


def knot_steps(total_steps: int, chain_length: int) -> set[int]:
    """Steps (1-based counts) after which a knot is tied: the ends of the first M - 1 phases."""
    return {round(total_steps * j / chain_length) for j in range(1, chain_length)} - {0, total_steps}


class CoLA(HighRankLoRA, LoRA):
    name = "cola"
    title = "Chain of LoRA: Efficient Fine-tuning of Language Models via Residual Learning"
    paper = "2401.04151"
    family = "low-rank-bottleneck"
    config_cls = ColaConfig
    mechanism_metrics = {
        "knots_tied": "knots tied: B A merged into W and a new link started (the chain's length - 1)",
        "update_rank_mean": "mean numerical rank of the whole update W - W0 over the layers",
    }

    def on_train_begin(self, state: TrainState) -> None:
        self.knots = knot_steps(state.total_steps, self.config.chain_length)
        self.tied = 0

    def on_step_end(self, state: TrainState) -> None:
        if state.step + 1 in self.knots:
            layers = high_rank_layers(state.model)
            for m in layers:
                m.variant.merge_low_rank(m)    # tie a knot: W <- W + s B_j A_j
                m.variant.reinit_low_rank(m)   # extend the chain: a new (A_{j+1}, B_{j+1} = 0)
            reset_optimizer_state(state.optimizer, [p for m in layers for p in (m.lora_A, m.lora_B)], 1.0)
            self.tied += 1

    def on_train_end(self, state: TrainState) -> None:
        state.metrics["knots_tied"] = self.tied
        self.report_rank(state)
