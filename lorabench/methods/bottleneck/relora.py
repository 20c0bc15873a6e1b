"""ReLoRA: High-Rank Training Through Low-Rank Updates (Lialin et al., arXiv 2307.05695).

Every `restart_every` steps the low-rank update is merged into the weight (W <- W + s B A), LoRA
restarts from a fresh init (B = 0: the function is unchanged), most of the optimizer state of A
and B is pruned by magnitude, and the learning rate re-warms ("jagged" schedule). The sum of the
merged updates has rank up to (restarts + 1) * r: the record's `update_rank_mean` shows it.
"""
from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.bottleneck.layer import HighRankLoRA, high_rank_layers, reset_optimizer_state
from lorabench.methods.lora import LoRA, LoraConfig


@dataclass
class ReLoraConfig(LoraConfig):
    restart_every: int = option(50, "merge B A into W and restart LoRA every this many steps (ReLoRA's reset "
                                    "frequency; the paper uses 5,000 of 20,000+ pre-training steps)", low=1)
    optimizer_prune_ratio: float = option(
        0.99, "fraction of each Adam moment of A and B zeroed by magnitude at a restart (sec. 3: 99%)",
        low=0.0, high=1.0)
    restart_warmup_steps: int = option(5, "linear learning-rate re-warm-up after each restart (the jagged "
                                          "schedule); 0 = none", low=0)


class ReLoRA(HighRankLoRA, LoRA):
    name = "relora"
    title = "ReLoRA: High-Rank Training Through Low-Rank Updates"
    paper = "2307.05695"
    family = "low-rank-bottleneck"
    config_cls = ReLoraConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.last_restart = 0
        self.restarts = 0

    def restart(self, state: TrainState, prune_ratio: float) -> None:
        """Merge, re-initialise, prune the optimizer state (Algorithm 1 of ReLoRA)."""
        layers = high_rank_layers(state.model)
        for m in layers:
            m.variant.merge_low_rank(m)
            m.variant.reinit_low_rank(m)
        reset_optimizer_state(state.optimizer, [p for m in layers for p in (m.lora_A, m.lora_B)], prune_ratio)
        self.last_restart = state.step + 1
        self.restarts += 1

    def on_train_begin(self, state: TrainState) -> None:
        self.last_restart, self.restarts = 0, 0

    def on_step_begin(self, state: TrainState) -> None:
        w = self.config.restart_warmup_steps
        since = state.step - self.last_restart
        if self.restarts and w and since < w and state.optimizer is not None:
            # The harness's LambdaLR recomputes lr from its base every step, so scaling here is local.
            for g in state.optimizer.param_groups:
                g["lr"] *= (since + 1) / (w + 1)

    def on_step_end(self, state: TrainState) -> None:
        done = state.step + 1
        if done % self.config.restart_every == 0 and done < state.total_steps:
            self.restart(state, self.config.optimizer_prune_ratio)

    def on_train_end(self, state: TrainState) -> None:
        state.metrics["restarts"] = self.restarts
        self.report_rank(state)
