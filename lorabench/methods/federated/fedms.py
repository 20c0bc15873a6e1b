"""FedMS: "FedMS: Federated Learning with Mixture of Sparsely Activated Foundations Models" (Wu et al.,
arXiv 2312.15926).

Two stages (sec. 4 of FedMS):

- **stage 1** (`stage1_rounds` rounds): the *global expert* (the backbone with a LoRA adapter, and the task
  head) is trained on every client and FedAvg'd, as FedIT.
- **stage 2**: each client builds a *mixture of foundation models* (MoFM): the frozen global expert beside
  `local_experts` local experts of its own (the backbone with a private LoRA each, trained on the client,
  never sent, kept between rounds in Flower's per-node `Context.state`), and a *gate* that scores the
  experts for each input and runs only the top `top_k` of them (sparse activation); the output is the
  gate-weighted sum of the selected experts' logits. The gate is what the clients train together: it is
  FedAvg'd every round of stage 2; the global expert stays as stage 1 left it.

What is built here and what is not: the experts share one pretrained backbone (an expert is that backbone
with its own LoRA, not a separate foundation model), and the gate is a linear map of the input's mean token
embedding (the paper's gate is a foundation model with an inserted gate adapter). The paper's *sparsely
activated LoRA* (SAL: LoRA modules in more transformer blocks activated as training goes on) is not built.
The global model the server scores is the global expert in stage 1, and in stage 2 the mixture with the
aggregated gate and untrained local experts (no client's own): a reference; the clients' personalised score
is the mixture each client trained. Per round the record carries the stage, the switch round, the share of examples routed to each expert and
the gate's entropy. As a single-task trial FedMS runs stage 1 for `stage1_ratio` of the steps, then stage 2.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState
from lorabench.methods.federated.base import FederatedLoRA, State, normalised, weighted_mean
from lorabench.methods.lora import LoraConfig, LoraLinear, LoraVariant

GATE = "fedms_gate."


@dataclass
class FedMSConfig(LoraConfig):
    local_experts: int = option(1, "local experts per client (each a private LoRA on the backbone), beside the "
                                   "global expert", low=1, high=8)
    top_k: int = option(1, "experts the gate activates for each input (sparse activation: the others do not run)",
                        low=1, high=9)
    stage1_rounds: int = option(2, "federated rounds that train the global expert before the mixture (stage 2) starts",
                                low=1)
    stage1_ratio: float = option(0.5, "single-task trial only: share of the steps spent in stage 1", low=0.0, high=1.0)

    def __post_init__(self):
        super().__post_init__()
        if self.top_k > self.local_experts + 1:
            raise ValueError(f"top_k={self.top_k} is more than the {self.local_experts + 1} experts "
                             f"(1 global + local_experts={self.local_experts}); use at most {self.local_experts + 1}")


class ExpertSwitch(LoraVariant):
    """The layer's adapter is the active expert's: 0 the global expert (lora_A, lora_B), j >= 1 local expert j."""

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        e = layer.expert
        if e == 0:
            return super().forward(layer, x)
        a, b = getattr(layer, f"local{e}_A"), getattr(layer, f"local{e}_B")
        return layer.base(x) + F.linear(F.linear(x, a), b) * layer.scale


def set_expert(model: nn.Module, e: int) -> None:
    for layer in model.modules():
        if isinstance(layer, LoraLinear):
            layer.expert = e


def mofm_forward(model: nn.Module, input_ids=None, attention_mask=None, labels=None, **kw):
    """The mixture of foundation models (sec. 4.2 of FedMS): the gate scores the experts from the input's mean
    token embedding, only the top-k run (each on the rows that chose it), their logits are mixed by the gate's
    weights: the raw probability for k = 1 (as Switch Transformer, arXiv 2101.03961, so the gate gets a gradient),
    renormalised over the top k for k > 1. In stage 1 the global expert alone runs."""
    inner = type(model).forward
    if model.fedms_stage == 1:
        set_expert(model, 0)
        return inner(model, input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw)
    if kw.get("use_cache") or kw.get("cache") is not None or kw.get("past_key_values") is not None:
        raise ValueError("fedms: the mixture runs each expert on the rows that chose it, so no one key-value cache "
                         "serves them; score full sequences")  # multiple choice falls back to full sequences
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    emb = model.get_input_embeddings()(input_ids).detach()  # (B, T, d): the frozen embedding
    pooled = (emb * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, d)
    probs = torch.softmax(getattr(model, GATE.rstrip("."))(pooled), -1)  # (B, E)
    top, idx = probs.topk(model.fedms_top_k, dim=-1)  # (B, k): only these experts run
    weights = top if model.fedms_top_k == 1 else top / top.sum(-1, keepdim=True)
    logits = None
    for e in idx.unique().tolist():
        rows = (idx == e).any(-1).nonzero().squeeze(-1)
        set_expert(model, e)
        sub = {k: v[rows] if torch.is_tensor(v) and v.shape[:1] == input_ids.shape[:1] else v for k, v in kw.items()}
        out = inner(model, input_ids=input_ids[rows], attention_mask=mask[rows], **sub).logits
        if logits is None:
            logits = out.new_zeros((input_ids.shape[0], *out.shape[1:]))
        w = (weights[rows] * (idx[rows] == e)).sum(-1)  # this expert's gate weight on each of its rows
        logits = logits.index_add(0, rows, out * w.view(-1, *[1] * (out.dim() - 1)))
    set_expert(model, 0)
    if model.training:
        model.fedms_usage += torch.bincount(idx.flatten(), minlength=model.fedms_experts).float()
        p = probs.detach()
        model.fedms_entropy.append(float(-(p * p.clamp(min=1e-12).log()).sum(-1).mean()))
    loss = None
    if labels is not None:
        if logits.dim() == 3:  # causal LM: token t predicts token t + 1
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        else:
            loss = F.cross_entropy(logits, labels)
    from transformers.modeling_outputs import SequenceClassifierOutput
    return SequenceClassifierOutput(loss=loss, logits=logits)


class FedMS(FederatedLoRA):
    name = "fedms"
    title = "FedMS: Federated learning with mixture of sparsely activated foundations models"
    paper = "2312.15926"
    config_cls = FedMSConfig
    mergeable = False  # a mixture of experts chosen per input has no single ΔW to fold in
    mechanism_metrics = {"stage": "the stage the client ended in: 1 global expert, 2 the mixture",
                         "switch_step": "single-task trial: the step at which the mixture started (-1: none)",
                         "expert_usage": "share of the examples routed to each expert in stage 2 (global first)",
                         "local_routed": "share of the gate's choices in stage 2 that went to a local expert (-1: none)",
                         "gate_entropy": "mean entropy (nats) of the gate's distribution over the experts in stage 2"}
    round_metrics = {"stage": "the stage this round trained in (1 global expert, 2 the mixture and its gate)",
                     "switch_round": "the round after which the mixture started (None: not yet)",
                     "local_routed": "mean over the round's clients of the share of the gate's choices that went to a "
                                     "local expert (the clients' metric)"}

    def __init__(self, config=None):
        super().__init__(config)
        self.rounds_done = 0
        self.switch_round: int | None = None
        self.last_stage = 1
        self.stage_from_server: int | None = None

    def variant(self) -> LoraVariant:
        return ExpertSwitch()

    @property
    def n_experts(self) -> int:
        return 1 + self.config.local_experts

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        super().apply(model, ctx)
        self.head_modules = list(ctx.head_modules)
        for layer in self.lora_layers(model):
            layer.expert = 0
            for j in range(1, self.n_experts):
                a = torch.empty_like(layer.lora_A)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                setattr(layer, f"local{j}_A", nn.Parameter(a, requires_grad=False))
                setattr(layer, f"local{j}_B", nn.Parameter(torch.zeros_like(layer.lora_B), requires_grad=False))
        emb = model.get_input_embeddings()
        gate = nn.Linear(emb.embedding_dim, self.n_experts).to(emb.weight.dtype)
        nn.init.zeros_(gate.bias)  # a random bias would send every input to one expert; the seeded weight routes by input
        gate.requires_grad_(False)
        model.add_module(GATE.rstrip("."), gate)
        model.fedms_stage, model.fedms_top_k, model.fedms_experts = 1, self.config.top_k, self.n_experts
        model.fedms_usage, model.fedms_entropy = torch.zeros(self.n_experts), []
        model.forward = types.MethodType(mofm_forward, model)  # the MoFM; a deepcopy rebinds it to the copy
        return model

    # -- the stages ----------------------------------------------------------------------------------
    def is_global(self, name: str) -> bool:
        """The global expert: its LoRA factors and the task head."""
        return name.endswith((".lora_A", ".lora_B")) or any(name.startswith(h + ".") for h in self.head_modules)

    def set_stage(self, model: nn.Module, stage: int) -> None:
        model.fedms_stage = stage
        for n, p in model.named_parameters():
            if n.startswith(GATE) or ".local" in n:
                p.requires_grad_(stage == 2)  # stage 2: the gate and the local experts train
            elif self.is_global(n):
                p.requires_grad_(stage == 1)  # stage 1: the global expert trains; frozen in stage 2

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in model.named_parameters()
                if self.is_global(n) or n.startswith(GATE) or ".local" in n}

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        # every tensor either stage trains; a frozen one has no gradient and AdamW skips it
        own = [p for n, p in model.named_parameters() if p.requires_grad or n.startswith(GATE) or ".local" in n]
        return [{"params": own, "lr": lr, "weight_decay": weight_decay}]

    def on_train_begin(self, state: TrainState) -> None:
        self.set_stage(state.model, self.stage_from_server or 1)
        state.model.fedms_usage, state.model.fedms_entropy = torch.zeros(self.n_experts), []
        self.switch_step = -1
        self._switch_at = None if self.stage_from_server else int(round(self.config.stage1_ratio * state.total_steps))

    def on_step_begin(self, state: TrainState) -> None:
        if self._switch_at is not None and state.step == self._switch_at:
            self.set_stage(state.model, 2)
            self.switch_step = state.step

    def on_train_end(self, state: TrainState) -> None:
        usage, ent = state.model.fedms_usage, state.model.fedms_entropy
        n = float(usage.sum())
        state.metrics.update({"stage": state.model.fedms_stage, "switch_step": self.switch_step,
                              "expert_usage": [round(float(u) / n, 4) for u in usage] if n else [],
                              "local_routed": round(1 - float(usage[0]) / n, 6) if n else -1.0,
                              "gate_entropy": round(sum(ent) / len(ent), 6) if ent else -1.0})

    # -- the rounds ----------------------------------------------------------------------------------
    def initial_state(self, model: nn.Module) -> State:
        self.set_stage(model, 1)
        out = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}  # global expert
        out.update({n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(GATE)})
        return out

    def download(self, global_state: State, slot: int, n_clients: int) -> State:
        if self.rounds_done < self.config.stage1_rounds:  # stage 1: the global expert only
            return {k: v for k, v in global_state.items() if not k.startswith(GATE)}
        return dict(global_state)  # stage 2: the frozen global expert and the gate

    def load_state(self, model: nn.Module, state: State) -> None:
        if any(k.startswith(GATE) for k in state):
            self.stage_from_server = 2
        elif any(k.endswith("lora_A") for k in state):
            self.stage_from_server = 1
        self.set_stage(model, self.stage_from_server or 1)
        super().load_state(model, state)

    def upload(self, model: nn.Module) -> State:
        """Stage 1: the global expert (LoRA and head); stage 2: the gate only (sec. 4.2)."""
        if model.fedms_stage == 1:
            return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(GATE)}

    def personal_state(self, model: nn.Module) -> State:
        """The local experts, trained in stage 2 and kept on the client (never sent)."""
        if model.fedms_stage == 1:
            return {}
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".local" in n}

    def aggregate(self, global_state, uploads, weights, slots, n_clients):
        w = normalised(weights)
        new = dict(global_state)
        for k in uploads[0]:
            new[k] = weighted_mean([u[k] for u in uploads], w)  # FedAvg: the global expert, then the gate
        self.last_stage = 2 if any(k.startswith(GATE) for k in uploads[0]) else 1
        self.rounds_done += 1
        if self.last_stage == 1 and self.rounds_done >= self.config.stage1_rounds and self.switch_round is None:
            self.switch_round = self.rounds_done
        return new, w

    def round_summary(self, slots: list[int]) -> dict:
        return {"stage": self.last_stage, "switch_round": self.switch_round}

    def load_global(self, model: nn.Module, global_state: State) -> None:
        self.load_state(model, global_state if self.switch_round is not None else
                        {k: v for k, v in global_state.items() if not k.startswith(GATE)})
