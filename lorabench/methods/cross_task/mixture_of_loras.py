"""Mixture-of-LoRAs: An Efficient Multitask Tuning for Large Language Models (MoA, arXiv 2403.03432).

Domain-specific LoRA experts combined by an explicit router supervised by domain labels (Feng et al., arXiv
2403.03432, sec. 3): first each expert is trained on its own task's data alone (here: for the first half of the
steps every example of task t goes through expert t, gate 1, whatever the router says: teacher forcing); then the
experts are combined under a router that picks one expert per example (sequence-level top-1) and is trained with
the cross-entropy of its distribution against the example's task (the domain label) beside the language-model
loss. At test time the router alone decides, from the example's content: a held-out task goes to the expert of the
training task it looks most like. The paper trains the experts in separate runs and then the router; here both
stages are one run of `train.steps` steps on the same round-robin batches (protocol (b)). Set `experts` to the
number of training tasks.
"""
from __future__ import annotations

from lorabench.methods.cross_task.mixture import MixtureMethod, config_with

# the paper's mechanism as MixtureConfig defaults (6 experts: suites/mixture.yaml's 6 training tasks)
MixtureOfLorasConfig = config_with(
    "MixtureOfLorasConfig", __name__, router="topk", top_k=1, level="sequence", balance="task-ce",
    balance_weight=0.1, teacher_forcing=0.5, experts=6, rank=3)


class MixtureOfLoras(MixtureMethod):
    __doc__ = __doc__
    name = "mixture-of-loras"
    title = "Mixture-of-LoRAs: An efficient multitask tuning method for large language models"
    paper = "2403.03432"
    config_cls = MixtureOfLorasConfig
    mechanism_metrics = {**MixtureMethod.mechanism_metrics,
                         "teacher_forced_steps": "steps in which each example used its own task's expert (first stage)"}
