"""ReLoRA: High-Rank Training Through Low-Rank Updates (Lialin et al., arXiv 2307.05695).

Every `restart_every` steps (by default a quarter of the trial's steps, so that three restarts
happen at any budget; the paper restarts every 5,000 of 20,000+ steps, the same proportion) the
low-rank update is merged into the weight (W <- W + s B A), LoRA restarts from a fresh init (B = 0: the function is unchanged), most of the optimizer state of A
and B is pruned by magnitude, and the learning rate re-warms ("jagged" schedule). The sum of the
merged updates has rank up to (restarts + 1) * r: the record's `restarts` and `update_rank_mean`
show it.
"""
from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import option
from lorabench.methods.base import TrainState, interval_in_budget
from lorabench.methods.low_rank_bottleneck.layer import HighRankLoRA, high_rank_layers, reset_optimizer_state
from lorabench.methods.lora import LoRA, LoraConfig


@dataclass
class ReLoraConfig(LoraConfig):
    restart_every: int | None = option(
        None, "merge B A into W and restart LoRA every this many steps (ReLoRA's reset frequency); None = a "
              "quarter of the trial's steps (the paper: 5,000 of 20,000+ steps); must be below the steps", low=1)
    optimizer_prune_ratio: float = option(
        0.99, "fraction of each Adam moment of A and B zeroed by magnitude at a restart (sec. 3: 99%)",
        low=0.0, high=1.0)
    restart_warmup_steps: int | None = option(
        None, "linear learning-rate re-warm-up after each restart (the jagged schedule); 0 = none; None = a "
              "tenth of the restart period, at least 1 step and shorter than the period (the paper: 50-100 steps "
              "for 5,000)", low=0)


class ReLoRA(HighRankLoRA, LoRA):
    name = "relora"
    title = "ReLoRA: High-Rank Training Through Low-Rank Updates"
    paper = "2307.05695"
    family = "low-rank-bottleneck"
    config_cls = ReLoraConfig
    mechanism_metrics = {
        "restarts": "merge-and-restarts done (W <- W + s B A, fresh A, B = 0, optimizer state pruned)",
        "restart_every": "the restart period in steps this trial used",
        "update_rank_mean": "mean numerical rank of the whole update W - W0 over the layers (up to (restarts+1) r)",
        "update_rank_max": "largest numerical rank of the whole update over the layers",
    }

    def __init__(self, config=None):
        super().__init__(config)
        self.last_restart = 0
        self.restarts = 0
        self.every, self.warmup = 0, 0

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
        # a restart after the last step would change nothing: the period must fit in steps - 1
        self.every = interval_in_budget(self.config.restart_every, 0.25, state.total_steps - 1, "restart_every")
        w = self.config.restart_warmup_steps
        self.warmup = min(self.every - 1, max(1, round(0.1 * self.every))) if w is None else w
        if self.warmup and self.warmup >= self.every:
            raise ValueError(f"restart_warmup_steps={self.warmup} is not shorter than the restart period "
                             f"{self.every}: the learning rate would never re-warm fully; lower it")
        state.metrics["restart_every"] = self.every

    def on_step_begin(self, state: TrainState) -> None:
        w = self.warmup
        since = state.step - self.last_restart
        if self.restarts and w and since < w and state.optimizer is not None:
            # The harness's LambdaLR recomputes lr from its base every step, so scaling here is local.
            for g in state.optimizer.param_groups:
                g["lr"] *= (since + 1) / (w + 1)

    def on_step_end(self, state: TrainState) -> None:
        done = state.step + 1
        if done % self.every == 0 and done < state.total_steps:
            self.restart(state, self.config.optimizer_prune_ratio)

    def on_train_end(self, state: TrainState) -> None:
        state.metrics["restarts"] = self.restarts
        self.report_rank(state)
