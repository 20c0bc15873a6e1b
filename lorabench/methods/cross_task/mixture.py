"""The mixture-of-LoRA-experts layer and method that every mixture method of the cross-task family is a
configuration of (issue 17; survey arXiv 2407.11046, sec. 4.3, "mixture of LoRA experts").

A `MixtureLinear` wraps a frozen linear W0 with E LoRA experts (A_e: (r_e, k), B_e: (d, r_e)) and a router:

    h = W0 x + Σ_e g_e(x) s_e B_e A_e x                       (the MoE-LoRA forward, e.g. MixLoRA eq. (4))

The router's gates g (one row per token) come from
- `softmax`: dense, g = softmax(W_r x)                              (LoRAMoE eq. (5))
- `topk`:    p = softmax(W_r x), g = p on the k largest, renormalised, 0 elsewhere (MixLoRA eq. (3))
- `task`:    g = softmax(W_g E_t[task])  from a task embedding, the same for every token of an example
             (MOELoRA eq. (6))
- `task-specific`: g = 1 on the shared (task-agnostic) experts and on the example's own task's expert, 0 elsewhere
             (MTLoRA's task-agnostic and task-specific modules)
- `static`:  g = s, one learnable scale per expert (MultiLoRA's horizontal parallel LoRAs)
at token level (x is the token's input) or sequence level (x is the mean of the example's non-pad token inputs:
one gate per example, Octavius' instance-level routing). Options: SiRA's expert capacity (each expert takes at most
C = ceil(capacity_factor * k * N / E) of a batch's N tokens, in token order; the rest skip it) and expert dropout
(dropout on the gate values); an auxiliary balancing loss, Switch's (MixLoRA eq. (6): E Σ_e f_e P_e) or LoRAMoE's
localized balancing constraint (LoRAMoE eq. (7)-(9)), which the method adds to the training loss through the
`extra_loss` hook.

The experts are computed batched, not in a Python loop: the E experts' A are one (E*r, k) matrix and their B
one (d, E*r) matrix, so the mixture is one rank-E*r LoRA whose middle vector is scaled by each expert's gate:
u = x A^T (N, E*r), u *= repeat(g s, r), out = u B^T. A top-k gate zeroes the other experts' slices: the
sparsity is in the result, not in the arithmetic (on a CPU at these ranks the dense GEMM is cheaper than
gathering tokens per expert; the SGMV kernels of lorabench/harness/multitask.py route by a segment, one adapter
per row, which a top-k > 1 mixture is not).

Routing context: the scenario (lorabench/harness/mixture.py) passes each example's task id as the batch key
`task_ids`; a forward pre-hook on the model takes it (and the attention mask, for sequence pooling and for
counting only real tokens) out of the model's keyword arguments before the model sees them. Without `task_ids`,
every example has the method's `default_task` (0 in a single-task trial; set per evaluated task by the scenario,
-1 for a task the mixture never trained on: the task gate is then the mean of the trained tasks' gates).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, Method, MethodConfig, TrainState, replace_module, resolve_targets
from lorabench.methods.lora.layer import init_matrix


@dataclass
class MixtureConfig(MethodConfig):
    experts: int = option(4, "number of LoRA experts E per adapted layer", low=1, high=256)
    rank: int = option(4, "rank r of each expert (E experts of rank r: the same parameters as one LoRA of rank E*r)",
                       low=1, high=1024)
    expert_ranks: list[int] | None = option(
        None, "per-expert ranks (length E, each at most rank; None: every expert has rank r): an expert of rank "
              "r_e uses the first r_e rows of its A", )
    alpha: float = option(8.0, "each expert's update is scaled by alpha / rank (LoRA eq. (3))", low=0.0)
    dropout: float = option(0.0, "dropout on the experts' input", low=0.0, high=0.99)
    router: Literal["softmax", "topk", "task", "task-specific", "static"] = option(
        "softmax", "the gate: 'softmax' dense over all experts (LoRAMoE), 'topk' the k largest renormalised "
                   "(MixLoRA, SiRA), 'task' from a learnt task embedding (MOELoRA), 'task-specific' the shared "
                   "experts plus the one expert of the example's task, gate 1 each (MTLoRA), 'static' one learnt "
                   "scale per expert (MultiLoRA)")
    shared_experts: int = option(1, "with router=task-specific: experts 0..shared_experts-1 serve every task "
                                    "(task-agnostic); expert shared_experts + t serves task t", low=0)
    top_k: int = option(2, "with router=topk: experts per token", low=1, high=256)
    renormalize: bool = option(True, "with router=topk: renormalise the k chosen probabilities to sum to 1 "
                                     "(Mixtral, MixLoRA); false keeps p_e itself (Switch Transformer: with k = 1 the "
                                     "router then still gets a gradient through the output)")
    level: Literal["token", "sequence"] = option(
        "token", "route each token ('token') or each example by the mean of its tokens' inputs ('sequence', "
                 "Octavius' instance-level gate)")
    balance: Literal["none", "switch", "lbc", "task-ce"] = option(
        "none", "auxiliary router loss: 'switch' E Σ_e f_e P_e (MixLoRA eq. (6), from Switch Transformer), "
                "'lbc' LoRAMoE's localized balancing constraint (its eq. (7)-(9)), 'task-ce' the cross-entropy of "
                "the router's distribution against the example's task id, expert t for task t (Mixture-of-LoRAs' "
                "domain-label supervision), 'none'")
    teacher_forcing: float = option(
        0.0, "fraction of the training steps, at the start, in which each example uses its own task's expert "
             "(expert t for task t, gate 1) whatever the router says: the experts are trained one per task first "
             "(Mixture-of-LoRAs' first stage)", low=0.0, high=1.0)
    balance_weight: float = option(0.01, "weight of the balancing loss in the training loss", low=0.0)
    lbc_delta: float = option(0.1, "LoRAMoE's δ: experts of a sample's own type weigh 1+δ in its importance, the "
                                   "others 1-δ", low=0.0, high=1.0)
    lbc_knowledge_experts: int = option(
        0, "LoRAMoE: how many experts form the world-knowledge group (the rest serve the downstream tasks); 0: half",
        low=0)
    capacity_factor: float | None = option(
        None, "SiRA's expert capacity: each expert takes at most ceil(factor * k * N / E) of a batch's N tokens, "
              "in token order (None: no limit)", low=0.0)
    expert_dropout: float = option(0.0, "SiRA's expert dropout: dropout on the gate values while training",
                                   low=0.0, high=0.99)
    n_tasks: int = option(16, "with router=task: rows of the task embedding (task ids 0..n_tasks-1)", low=1, high=4096)
    task_dim: int = option(64, "with router=task: the task embedding's width", low=1, high=4096)
    experts_by_depth: list[int] | None = option(
        None, "MoLA: experts per layer by depth, one count per equal group of the model's layers, lowest first "
              "(e.g. [2, 4, 6, 8]); None: `experts` in every layer")

    def __post_init__(self):
        if self.alpha == 0:
            raise ValueError("alpha=0 makes the update vanish; use a positive alpha")
        if self.router == "topk" and self.top_k > self.experts and self.experts_by_depth is None:
            raise ValueError(f"top_k={self.top_k} is more than experts={self.experts}; use top_k <= experts")
        if self.expert_ranks is not None:
            if len(self.expert_ranks) != self.experts or not all(1 <= r <= self.rank for r in self.expert_ranks):
                raise ValueError(f"expert_ranks={self.expert_ranks} must list {self.experts} ranks (one per expert), "
                                 f"each between 1 and rank={self.rank}")
        if self.experts_by_depth is not None and (not self.experts_by_depth or min(self.experts_by_depth) < 1):
            raise ValueError(f"experts_by_depth={self.experts_by_depth} must be a non-empty list of positive counts")
        if self.router == "task-specific" and self.shared_experts >= self.experts:
            raise ValueError(f"router=task-specific needs more experts ({self.experts}) than shared_experts "
                             f"({self.shared_experts}): one expert per task after the shared ones")
        if self.balance == "task-ce" and (self.router not in ("softmax", "topk") or self.level != "sequence"):
            raise ValueError("balance=task-ce supervises one routing decision per example: use router=topk or "
                             "softmax with level=sequence")
        if self.teacher_forcing > 0 and self.router in ("task", "task-specific", "static"):
            raise ValueError(f"teacher_forcing trains expert t on task t before the router takes over; "
                             f"router={self.router!r} does not take over")
        if self.balance != "none" and self.router in ("task", "task-specific", "static"):
            raise ValueError(f"balance={self.balance!r} balances a router of tokens; router={self.router!r} does not "
                             f"route by input; use balance=none")


class Routing:
    """What the layers of one model read besides their input: each example's task id and the attention mask."""

    def __init__(self):
        self.task_ids: torch.Tensor | None = None   # (B,) long, -1 = a task the mixture has not trained on
        self.mask: torch.Tensor | None = None       # (B, T) of the current call
        self.default_task = 0
        self.force_task = False                     # teacher forcing: expert t for task t, whatever the router says
        self.trained_tasks = 1                      # task ids 0..trained_tasks-1 trained (for the unknown-task gate)

    def hook(self, module, args, kwargs):
        """Forward pre-hook of the model: take `task_ids` out of its keyword arguments, keep the mask."""
        ids = kwargs.pop("task_ids", None)
        self.mask = kwargs.get("attention_mask")
        ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        if ids is None and ref is not None:
            ids = torch.full((ref.shape[0],), self.default_task, dtype=torch.long)
        self.task_ids = ids
        return args, kwargs


class MixtureLinear(nn.Module):
    """A frozen linear plus E LoRA experts and a router (module docstring)."""

    def __init__(self, base: nn.Linear, c: MixtureConfig, experts: int, routing: Routing):
        super().__init__()
        self.base, self.routing = base, routing
        self.in_features, self.out_features = base.in_features, base.out_features
        self.E, self.r, self.scale, self.c = experts, c.rank, c.alpha / c.rank, c
        dt, dev = base.weight.dtype, base.weight.device
        k, d = self.in_features, self.out_features
        self.lora_A = nn.Parameter(torch.zeros(experts * c.rank, k, dtype=dt, device=dev))  # (E*r, k): A_e stacked
        self.lora_B = nn.Parameter(torch.zeros(d, experts * c.rank, dtype=dt, device=dev))  # (d, E*r): B_e side by side
        for e in range(experts):
            init_matrix(self.lora_A.data[e * c.rank:(e + 1) * c.rank], "kaiming", c.rank)  # each A_e as LoRA's; B = 0
        ranks = c.expert_ranks if c.expert_ranks is not None and len(c.expert_ranks) == experts else [c.rank] * experts
        mask = torch.zeros(experts, c.rank, dtype=dt, device=dev)
        for e, r in enumerate(ranks):
            mask[e, :r] = 1.0
        self.register_buffer("rank_mask", mask.reshape(-1), persistent=False)  # (E*r,) per-expert rank
        if c.router in ("softmax", "topk"):
            self.router = nn.Linear(k, experts, bias=False, dtype=dt, device=dev)   # W_r
        elif c.router == "task":
            self.task_embedding = nn.Embedding(c.n_tasks, c.task_dim, dtype=dt, device=dev)  # E_t of MOELoRA
            self.router = nn.Linear(c.task_dim, experts, bias=False, dtype=dt, device=dev)   # W_g
        else:
            self.expert_scale = nn.Parameter(torch.ones(experts, dtype=dt, device=dev))    # MultiLoRA's learnt scales
        self.aux: torch.Tensor | None = None   # the balancing loss of the last training forward
        self.stats = {"tokens": 0.0, "load": torch.zeros(experts), "prob": torch.zeros(experts), "entropy": 0.0,
                      "dropped": 0.0, "assigned": 0.0}

    # -- the router -------------------------------------------------------------------------------
    def _token_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) 1 for a real token of this call (the model's mask, its last T columns under a KV cache)."""
        B, T = x.shape[0], x.shape[1]
        m = self.routing.mask
        if m is None or m.shape[0] != B or getattr(self, "_pooled", False):
            return torch.ones(B, T, device=x.device)
        return m[:, -T:].to(x.device, torch.float32)

    def _probs(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The router's distribution p (B, T, E) before top-k (or the static scales)."""
        B, T = x.shape[0], x.shape[1]
        c = self.c
        if c.router == "static":
            return self.expert_scale.expand(B, T, self.E)
        if c.router == "task-specific":   # MTLoRA: the task-agnostic experts + the example's task-specific one
            ids = self.routing.task_ids
            ids = torch.zeros(B, dtype=torch.long) if ids is None or ids.shape[0] != B else ids
            n_specific = self.E - c.shared_experts
            if bool((ids >= n_specific).any()):
                raise ValueError(f"task id {int(ids.max())} has no task-specific expert: this layer has {n_specific} "
                                 f"(experts={self.E} - shared_experts={c.shared_experts}); set experts to "
                                 f"shared_experts + the number of training tasks")
            g = torch.zeros(B, self.E, device=x.device, dtype=x.dtype)
            g[:, : c.shared_experts] = 1.0
            known = ids >= 0                  # a task never trained (-1): the shared experts alone
            g[known.nonzero().flatten(), (c.shared_experts + ids[known]).to(x.device)] = 1.0
            return g[:, None, :].expand(B, T, self.E)
        if c.router == "task":
            ids = self.routing.task_ids
            ids = torch.zeros(B, dtype=torch.long) if ids is None or ids.shape[0] != B else ids
            known = ids.clamp(min=0) % c.n_tasks
            p = torch.softmax(self.router(self.task_embedding(known.to(x.device))), -1)       # (B, E), eq. (6)
            if bool((ids < 0).any()):   # a task never trained: the mean gate of the trained tasks
                seen = torch.arange(min(self.routing.trained_tasks, c.n_tasks), device=x.device)
                mean = torch.softmax(self.router(self.task_embedding(seen)), -1).mean(0)
                p = torch.where((ids < 0).to(x.device)[:, None], mean.expand_as(p), p)
            return p[:, None, :].expand(B, T, self.E)
        if c.level == "sequence":   # one gate per example from the mean of its real tokens' inputs
            pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)   # (B, k)
            return torch.softmax(self.router(pooled), -1)[:, None, :].expand(B, T, self.E)
        return torch.softmax(self.router(x), -1)                                            # (B, T, E)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(g, p, mask): the gate values used (B, T, E), the router's distribution, the real-token mask."""
        c = self.c
        mask = self._token_mask(x)
        p = self._probs(x, mask)
        g = p
        if self.routing.force_task and self.training and self.routing.task_ids is not None:
            ids = self.routing.task_ids.to(x.device)
            ok = (ids >= 0) & (ids < self.E)
            g = torch.zeros_like(p)
            g[ok.nonzero().flatten(), :, ids[ok]] = 1.0               # (B, T, E): each example its task's expert
            return g, p, mask
        if c.router == "topk":   # MixLoRA eq. (3): the top-k of softmax(W_r x), renormalised over those k
            k = min(c.top_k, self.E)
            val, idx = p.topk(k, dim=-1)
            g = torch.zeros_like(p).scatter(-1, idx, val / val.sum(-1, keepdim=True) if c.renormalize else val)
        if c.capacity_factor is not None and c.router in ("softmax", "topk"):   # SiRA: expert capacity
            k = min(c.top_k, self.E) if c.router == "topk" else self.E
            n = float(mask.sum())
            cap = math.ceil(c.capacity_factor * k * n / self.E)
            chosen = (g > 0).float() * mask[..., None]                          # (B, T, E) real assignments
            order = chosen.reshape(-1, self.E).cumsum(0).reshape_as(chosen)     # position in each expert's queue
            keep = (order <= cap).float()
            self._capacity = (float((chosen * (1 - keep)).sum()), float(chosen.sum()))
            g = g * keep
        if self.training and c.expert_dropout > 0:   # SiRA: expert dropout on the gate
            g = F.dropout(g, c.expert_dropout, True)
        return g, p, mask

    # -- the balancing losses ---------------------------------------------------------------------
    def switch_loss(self, g: torch.Tensor, p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MixLoRA eq. (6) (Switch Transformer eq. (4)): E Σ_e f_e P_e over the real tokens, f_e the fraction of
        the token-to-expert assignments that went to e, P_e the mean router probability of e."""
        m = mask[..., None]
        assigned = (g > 0).float() * m
        f = assigned.sum((0, 1)) / assigned.sum().clamp(min=1)
        P = (p * m).sum((0, 1)) / m.sum().clamp(min=1)
        return self.E * (f * P).sum()

    def task_ce_loss(self, p: torch.Tensor) -> torch.Tensor:
        """Mixture-of-LoRAs' domain-label supervision: -log p_t of the example's task t under the router's
        (sequence-level) distribution, averaged over the examples whose task has an expert."""
        ids = self.routing.task_ids
        B = p.shape[0]
        if ids is None or ids.shape[0] != B:
            return p.sum() * 0.0
        ids = ids.to(p.device)
        ok = (ids >= 0) & (ids < self.E)
        if not bool(ok.any()):
            return p.sum() * 0.0
        logp = p[:, 0, :].clamp(min=1e-12).log()                       # (B, E): one distribution per example
        return -logp[ok.nonzero().flatten(), ids[ok]].mean()

    def lbc_loss(self, g: torch.Tensor, mask: torch.Tensor, sample_types: torch.Tensor) -> torch.Tensor:
        """LoRAMoE's localized balancing constraint: Q[e, m] = Σ_tokens of sample m g_e (the importance, eq. (7)),
        I[e, m] = 1+δ where expert e's type is sample m's, else 1-δ (eq. (8)), Z = I ∘ Q, loss σ²(Z)/μ(Z) (eq. (9))."""
        Q = (g * mask[..., None]).sum(1).T                                          # (E, B)
        c = self.c
        knowledge = c.lbc_knowledge_experts or self.E // 2
        expert_type = (torch.arange(self.E, device=g.device) >= knowledge).long()   # 0 knowledge, 1 task experts
        match = expert_type[:, None] == sample_types.to(g.device)[None, :]
        I = torch.where(match, 1 + c.lbc_delta, 1 - c.lbc_delta)
        Z = I * Q
        return Z.var(unbiased=False) / Z.mean().clamp(min=1e-9)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 2   # (B, k): one vector per example (BERT's pooler), a sequence of one token
        x3 = x[:, None, :] if squeeze else x                             # (B, T, k)
        self._pooled = squeeze
        g, p, mask = self.gates(x3)
        h = F.dropout(x3, self.c.dropout, self.training) if self.c.dropout > 0 else x3
        u = F.linear(h, self.lora_A) * self.rank_mask                   # (B, T, E*r): every A_e x at once
        w = (g * self.scale).repeat_interleave(self.r, dim=-1)          # (B, T, E*r): g_e s for each of e's r rows
        out = self.base(x3) + F.linear(u * w, self.lora_B)               # W0 x + Σ_e g_e s B_e A_e x
        self._record(g, p, mask)
        if self.training and self.c.balance != "none":
            if self.c.balance == "switch":
                self.aux = self.switch_loss(g, p, mask)
            elif self.c.balance == "task-ce":
                self.aux = self.task_ce_loss(p)
            else:
                self.aux = self.lbc_loss(g, mask, self.sample_types(x3.shape[0]))
        return out[:, 0] if squeeze else out

    def sample_types(self, B: int) -> torch.Tensor:
        """LoRAMoE's sample type per example: 0 for a world-knowledge task, 1 for a downstream task."""
        ids = self.routing.task_ids
        knowledge = getattr(self.routing, "knowledge_task_ids", set())
        if ids is None or ids.shape[0] != B:
            return torch.ones(B, dtype=torch.long)
        return torch.tensor([0 if int(t) in knowledge else 1 for t in ids], dtype=torch.long)

    @torch.no_grad()
    def _record(self, g, p, mask) -> None:
        m = mask[..., None]
        s = self.stats
        n = float(mask.sum())
        s["tokens"] += n
        s["load"] += (g.abs() * m).sum((0, 1)).float().cpu()        # gate mass per expert
        s["prob"] += (p * m).sum((0, 1)).float().cpu()
        if self.c.router not in ("static", "task-specific"):
            ent = -(p.clamp(min=1e-12).log() * p).sum(-1)               # (B, T) the router's entropy per token
            s["entropy"] += float((ent * mask).sum())
        if hasattr(self, "_capacity"):
            s["dropped"] += self._capacity[0]
            s["assigned"] += self._capacity[1]
            del self._capacity

    def reset_stats(self) -> None:
        self.stats = {"tokens": 0.0, "load": torch.zeros(self.E), "prob": torch.zeros(self.E), "entropy": 0.0,
                      "dropped": 0.0, "assigned": 0.0}

    def delta_weight(self, expert: int) -> torch.Tensor:
        """s B_e A_e (d, k): one expert's dense update."""
        sl = slice(expert * self.r, (expert + 1) * self.r)
        mask = self.rank_mask[sl]
        return self.scale * (self.lora_B[:, sl] * mask) @ self.lora_A[sl]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, experts={self.E}, rank={self.r}, router={self.c.router}"


class MixtureMethod(Method):
    """A mixture of LoRA experts: `MixtureLinear` in every target layer; a subclass is a configuration of it
    (its config class's defaults) plus, where its paper has one, a different expert count per layer."""

    name = "mixture"
    title = "Mixture of LoRA experts (the shared layer)"
    paper = "2407.11046"
    family = "cross-task"
    config_cls: ClassVar[type] = MixtureConfig
    default_lr = 5e-4
    layer_type = None   # the router's output depends on the input: no merge into the base weights
    mechanism_metrics = {
        "expert_load": "per expert, its share of the gate mass Σ_tokens g_e / Σ_tokens Σ_e g_e, averaged over layers "
                       "(training)",
        "load_cv": "the coefficient of variation of expert_load over the experts of each layer, averaged over "
                   "layers (0 = perfectly balanced)",
        "router_entropy": "the router's mean entropy per token, in nats (log E = uniform)",
        "aux_loss_last": "the balancing loss added at the last step (0 without one)",
        "experts_per_layer": "the number of experts per transformer block, lowest first (MoLA: more in higher layers)",
    }

    def __init__(self, config=None):
        super().__init__(config)
        self.routing = Routing()

    def experts_for(self, layer_index: int, n_layers: int) -> int:
        """Experts in the layer of depth `layer_index` (0 = lowest) of `n_layers` (MoLA: by depth group)."""
        by = self.config.experts_by_depth
        if by is None:
            return self.config.experts
        return by[min(len(by) - 1, layer_index * len(by) // max(1, n_layers))]

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        import re
        self.freeze_all_but_head(model, ctx)
        names = resolve_targets(model, self.config.target_modules, ctx)
        depth = {n: int(m.group(1)) for n in names if (m := re.search(r"\.(\d+)\.", n))}
        n_layers = max(depth.values()) + 1 if depth else 1
        for name in names:
            E = self.experts_for(depth.get(name, 0), n_layers)
            layer = MixtureLinear(model.get_submodule(name), self.config, E, self.routing)
            layer.depth = depth.get(name, 0)
            replace_module(model, name, layer)
        model.register_forward_pre_hook(self.routing.hook, with_kwargs=True)
        return model

    def mixture_layers(self, model: nn.Module) -> list[MixtureLinear]:
        return [m for m in model.modules() if isinstance(m, MixtureLinear)]

    def set_task(self, task_id: int, trained_tasks: int | None = None) -> None:
        """The task id every example has when a batch carries none (-1: a task the mixture never trained on)."""
        self.routing.default_task = task_id
        if trained_tasks is not None:
            self.routing.trained_tasks = trained_tasks

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        if self.config.balance == "none":
            return None
        losses = [m.aux for m in self.mixture_layers(state.model) if m.aux is not None]
        if not losses:
            return None
        aux = torch.stack(losses).mean()
        state.metrics["aux_loss_last"] = round(float(aux.detach()), 6)
        return self.config.balance_weight * aux

    def on_train_begin(self, state: TrainState) -> None:
        for m in self.mixture_layers(state.model):
            m.reset_stats()

    def on_step_begin(self, state: TrainState) -> None:
        # teacher forcing for the first `teacher_forcing` of the steps (Mixture-of-LoRAs: experts first, then routing)
        forced = state.step < round(self.config.teacher_forcing * state.total_steps)
        self.routing.force_task = forced
        if forced:
            state.metrics["teacher_forced_steps"] = state.metrics.get("teacher_forced_steps", 0) + 1

    def on_train_end(self, state: TrainState) -> None:
        self.routing.force_task = False
        state.metrics.update(self.router_metrics(state.model))
        state.metrics.setdefault("aux_loss_last", 0.0)

    def router_metrics(self, model: nn.Module, reset: bool = True) -> dict:
        """Per-expert load, its imbalance and the router's entropy, from the layers' counts since the last reset
        (experts of layers with fewer experts than the most are padded with nothing: loads are per layer size)."""
        layers = self.mixture_layers(model)
        if not layers or not any(m.stats["tokens"] for m in layers):
            return {}
        E = max(m.E for m in layers)
        load = torch.zeros(E)
        cvs, ent, tok, dropped, assigned = [], 0.0, 0.0, 0.0, 0.0
        for m in layers:
            s = m.stats
            frac = s["load"] / s["load"].sum().clamp(min=1)
            load[: m.E] += frac
            cvs.append(float(frac.std(unbiased=False) / frac.mean().clamp(min=1e-12)) if m.E > 1 else 0.0)
            ent += s["entropy"]
            tok += s["tokens"]
            dropped += s["dropped"]
            assigned += s["assigned"]
            if reset:
                m.reset_stats()
        out = {"expert_load": [round(float(x), 4) for x in load / len(layers)],
               "experts_per_layer": [E for _, E in sorted({getattr(m, "depth", 0): m.E for m in layers}.items())],
               "load_cv": round(sum(cvs) / len(cvs), 4),
               "router_entropy": round(ent / tok, 4) if tok and self.config.router not in ("static", "task-specific")
               else None}
        if self.config.capacity_factor is not None:
            out["capacity_dropped_fraction"] = round(dropped / assigned, 4) if assigned else 0.0
        return out

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.trainable_parameters(model)}


def config_with(name: str, module: str, **defaults) -> type:
    """A MixtureConfig subclass named `name` whose only difference is its defaults (a method's paper setting):
    each overridden option keeps the help text and bounds it has in MixtureConfig."""
    import dataclasses
    import typing
    hints = typing.get_type_hints(MixtureConfig)
    base = {f.name: f for f in dataclasses.fields(MixtureConfig)}
    fields = []
    for k, v in defaults.items():
        if k not in base:
            raise ValueError(f"config_with: {k!r} is not a MixtureConfig option")
        f = (dataclasses.field(default_factory=lambda v=v: list(v), metadata=base[k].metadata) if isinstance(v, list)
             else dataclasses.field(default=v, metadata=base[k].metadata))
        fields.append((k, hints[k], f))
    cls = dataclasses.make_dataclass(name, fields, bases=(MixtureConfig,))
    cls.__module__ = module
    return cls
