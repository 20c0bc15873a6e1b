"""X-LoRA: Mixture of Low-Rank Adapter Experts, a Flexible Framework for Large Language Models with Applications in
Protein Mechanics and Design (arXiv 2402.07148).

Frozen LoRA experts gated by a scaling head that reads the model's own hidden states (Buehler & Buehler, arXiv
2402.07148, sec. 2 and Fig. 1): every forward is two passes over the same input.

1. The scaling pass (the paper's "dummy" pass): the model runs with every adapter off (scalings 0: the base model)
   and returns its last hidden states h (B, T, H); no gradient flows through this pass.
2. The scaling head maps h to one scaling per token, per adapted layer l and per expert e:
       λ = softmax(head(h) / τ)  over the experts,  reshaped (B, T, L, E)          (the X-LoRA classifier)
   `head` is a linear map (depth 1) or a ReLU MLP; with `router=topk` only the k largest scalings of each token and
   layer are kept and renormalised (X-LoRA's top-k option with softmax over the chosen ones: renormalising the
   softmax over the k equals a softmax of their logits). `layerwise=false` gives every layer the same scalings.
3. The second pass runs with the experts on, each adapted layer l adding Σ_e λ_{t,l,e} s B_e A_e x_t to W0 x_t
   (the mixture layer's forward, lorabench/methods/cross_task/mixture.py, with λ as the gate).

As in the paper, the experts are frozen and only the scaling head is trained. The paper loads experts fine-tuned
beforehand, one per domain; here they are trained in the same run, one per training task, in a first stage of
`teacher_forcing` x the steps (expert t on task t's examples, gate 1: the per-task stage of Mixture-of-LoRAs), then
frozen for the rest of the steps, in which only the head trains. The scaling pass is skipped during the first stage
(its scalings are not used). Sequence scoring with a key-value cache is refused (the scaling pass needs the whole
sequence); the multiple-choice scorer then scores full sequences.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState, replace_module, resolve_targets
from lorabench.methods.cross_task.mixture import MixtureLinear, MixtureMethod, config_with

# experts: one per training task of suites/mixture.yaml's split (6), rank 3 (rank 18 in all, as mixture-of-loras)
_Defaults = config_with("_XLoraDefaults", __name__, router="softmax", teacher_forcing=0.5, experts=6, rank=3)


@dataclass
class XLoraConfig(_Defaults):
    head_depth: int = option(1, "layers of the scaling head: 1 a linear map of the hidden state (X-LoRA's default "
                                "depth), more a ReLU MLP of width head_size", low=1, high=8)
    head_size: int = option(64, "with head_depth > 1: the width of the scaling head's hidden layers", low=1,
                            high=65536)
    temperature: float = option(1.0, "softmax temperature τ of the scalings (X-LoRA's softmax_temperature)",
                                low=1e-3, high=1e3)
    layerwise: bool = option(True, "one scaling per adapted layer and expert (X-LoRA's layerwise scalings); false: "
                                   "the same scalings in every layer")

    def __post_init__(self):
        if self.router not in ("softmax", "topk"):
            raise ValueError(f"x-lora's scalings are a softmax over the experts (router=softmax) or its top-k "
                             f"(router=topk); router={self.router!r} is not")
        if self.level != "token":
            raise ValueError("x-lora scales every token from its own hidden state: use level=token")
        if self.balance != "none":
            raise ValueError("x-lora trains its scaling head on the task loss alone: use balance=none")
        if self.teacher_forcing <= 0:
            raise ValueError("x-lora's experts are trained one per task in a first stage (teacher_forcing of the "
                             "steps), then frozen while the head trains; teacher_forcing=0 would leave them at B = 0, "
                             "where the head gets no gradient: use 0 < teacher_forcing < 1")
        if self.teacher_forcing >= 1:
            raise ValueError("teacher_forcing=1 leaves no step to train the scaling head: use 0 < teacher_forcing < 1")
        super().__post_init__()


class ScalingHead(nn.Module):
    """h (B, T, H) -> scaling logits (B, T, L, E): X-LoRA's classifier on the scaling pass's last hidden states."""

    def __init__(self, hidden: int, layers: int, experts: int, c: XLoraConfig, dtype, device):
        super().__init__()
        self.layers, self.experts = layers, experts
        mods: list[nn.Module] = []
        width = hidden
        for _ in range(c.head_depth - 1):
            mods += [nn.Linear(width, c.head_size, dtype=dtype, device=device), nn.ReLU()]
            width = c.head_size
        mods.append(nn.Linear(width, layers * experts, dtype=dtype, device=device))
        self.net = nn.Sequential(*mods)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).unflatten(-1, (self.layers, self.experts))     # (B, T, L, E)


class XLoraLinear(MixtureLinear):
    """A mixture layer whose gate is its slice of the scaling head's output (no router of its own)."""

    def __init__(self, base: nn.Linear, c: XLoraConfig, experts: int, routing, index: int):
        super().__init__(base, c, experts, routing)
        del self.router          # the model-wide scaling head replaces the per-layer router
        self.index = index       # l: this layer's column of the scalings

    def _probs(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = self.routing.scalings
        if s is None:
            if self.routing.force_task:   # first stage: the gate is forced; the scalings are not computed
                return torch.full((x.shape[0], x.shape[1], self.E), 1.0 / self.E, dtype=x.dtype, device=x.device)
            raise RuntimeError("x-lora: no scalings for this forward; the scaling pass runs in the model's forward "
                               "pre-hook, so call the model, not a layer alone")
        s = s[:, :, self.index if self.c.layerwise else 0, :]                 # (B, T, E)
        if getattr(self, "_pooled", False):   # one vector per example (BERT's pooler): its first token's scalings
            s = s[:, :1]
        return s.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing.scaling_pass:     # the scaling ("dummy") pass: every adapter off, the base layer alone
            return self.base(x)
        return super().forward(x)


class XLoRA(MixtureMethod):
    __doc__ = __doc__
    name = "x-lora"
    title = ("X-LoRA: Mixture of low-rank adapter experts, a flexible framework for large language models with "
             "applications in protein mechanics and design")
    paper = "2402.07148"
    config_cls = XLoraConfig
    default_lr = 1e-3
    mechanism_metrics = {
        **MixtureMethod.mechanism_metrics,
        "router_entropy": "the scalings' mean entropy per token and layer, in nats, over the head-training stage "
                          "(log E = uniform)",
        "scaling_entropy_by_depth": "the scalings' mean entropy per token, per transformer block (lowest first), "
                                    "averaged over the block's adapted layers, over the head-training stage",
        "teacher_forced_steps": "steps of the first stage (expert t trained on task t), after which the experts froze",
        "frozen_expert_params": "expert parameters frozen for the head-training stage",
        "tokens_per_s_experts_stage": "median training tokens/s of the first stage (one pass, no scaling head)",
        "tokens_per_s_head_stage": "median training tokens/s of the second stage (the scaling pass + the gated pass)",
    }

    def __init__(self, config=None):
        super().__init__(config)
        self.routing.scaling_pass = False
        self.routing.scalings = None
        self.head: ScalingHead | None = None
        self._frozen = False
        self._rates: dict[str, list[float]] = {"experts": [], "head": []}

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        import re
        self.freeze_all_but_head(model, ctx)
        names = resolve_targets(model, self.config.target_modules, ctx)
        for i, name in enumerate(names):
            layer = XLoraLinear(model.get_submodule(name), self.config, self.config.experts, self.routing, i)
            m = re.search(r"\.(\d+)\.", name)
            layer.depth = int(m.group(1)) if m else 0
            replace_module(model, name, layer)
        ref = next(p for p in model.parameters())
        self.head = ScalingHead(model.config.hidden_size, len(names) if self.config.layerwise else 1,
                                self.config.experts, self.config, ref.dtype, ref.device)
        model.xlora_scaling_head = self.head      # a submodule: trained, saved and loaded with the experts
        model.register_forward_pre_hook(self.routing.hook, with_kwargs=True)
        model.register_forward_pre_hook(self.scaling_pass, with_kwargs=True)   # after routing.hook took task_ids
        return model

    def scaling_pass(self, module: nn.Module, args, kwargs):
        """Forward pre-hook of the model: the scaling pass with the adapters off, then the head's scalings."""
        r = self.routing
        if r.scaling_pass:                       # the hook's own call below
            return None
        r.scalings = None
        if r.force_task and module.training:     # first stage: the experts train under the forced gate
            return None
        if any(kwargs.get(k) is not None for k in ("past_key_values", "cache")):
            raise ValueError("x-lora's scaling pass reads the hidden states of the whole sequence; it cannot continue "
                             "from a key-value cache of a prefix: score full sequences")
        saved = (r.task_ids, r.mask)
        r.scaling_pass = True
        try:
            with torch.no_grad():
                kw = {k: v for k, v in kwargs.items() if k != "labels"}
                out = module(*args, **kw, output_hidden_states=True, return_dict=True)
        finally:
            r.scaling_pass = False
            r.task_ids, r.mask = saved
        h = out.hidden_states[-1]                                     # (B, T, H) of the base model
        r.scalings = torch.softmax(self.head(h) / self.config.temperature, dim=-1)   # (B, T, L, E)
        return None

    def expert_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for m in self.mixture_layers(model) for p in (m.lora_A, m.lora_B)]

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained tensors (a task head's too), and the experts, frozen or not."""
        return {**super().adapter_state_dict(model),
                **{n: p.detach() for n, p in model.named_parameters() if ".lora_A" in n or ".lora_B" in n
                   or n.startswith("xlora_scaling_head.")}}

    def on_train_begin(self, state: TrainState) -> None:
        super().on_train_begin(state)
        self._frozen = False
        self._rates = {"experts": [], "head": []}

    def on_step_begin(self, state: TrainState) -> None:
        super().on_step_begin(state)              # teacher forcing for the first stage
        if not self.routing.force_task and not self._frozen:   # the experts are trained: freeze them, train the head
            params = self.expert_parameters(state.model)
            for p in params:
                p.requires_grad_(False)
            self._frozen = True
            state.metrics["frozen_expert_params"] = sum(p.numel() for p in params)
            for m in self.mixture_layers(state.model):   # the statistics of the head-training stage only
                m.reset_stats()
        self._t0 = time.perf_counter()

    def on_step_end(self, state: TrainState) -> None:
        b = state.batch
        tokens = int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
        if state.step > 0:                        # the first step warms up
            self._rates["experts" if self.routing.force_task else "head"].append(
                tokens / (time.perf_counter() - self._t0))

    def on_train_end(self, state: TrainState) -> None:
        super().on_train_end(state)
        state.metrics.setdefault("teacher_forced_steps", 0)
        state.metrics.setdefault("frozen_expert_params", 0)
        for stage, rates in self._rates.items():
            state.metrics[f"tokens_per_s_{stage}_stage"] = round(statistics.median(rates), 2) if rates else None

    def router_metrics(self, model: nn.Module, reset: bool = True) -> dict:
        by_depth: dict[int, list[float]] = {}
        for m in self.mixture_layers(model):
            if m.stats["tokens"]:
                by_depth.setdefault(m.depth, []).append(m.stats["entropy"] / m.stats["tokens"])
        out = super().router_metrics(model, reset)
        if out:
            out["scaling_entropy_by_depth"] = [round(sum(v) / len(v), 4) for _, v in sorted(by_depth.items())]
        return out
