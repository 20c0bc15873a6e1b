"""MLoRE: Multi-Task Dense Prediction via Mixture of Low-Rank Experts (Yang et al., CVPR 2024, arXiv 2403.17749).

MLoRE is a decoder module for multi-task dense prediction in vision: each task's feature map goes through three
parallel paths whose outputs are summed (the paper's sec. 3 and Fig. 2; the released code,
github.com/YuqiYang213/MLoRE, models/transformers/MLoRE.py, class MOEBlock):

1. a task-sharing *generic* path, one convolution that every task's feature goes through (explicit parameter
   sharing: the global relation among all tasks); in the released code its input is detached
   (`share_conv(out.detach())`), so the generic path trains its own weights without back-propagating into the
   task features;
2. task-sharing *low-rank experts* of DIFFERENT ranks (PASCAL-Context: 15 experts of ranks 16, 24, ..., 128,
   configs/pascal/pascal_vitLp16_MLoRE.yml `rank_list`), each a k x k convolution down to its rank followed by a
   1 x 1 convolution back up, *linear* (no activation between them), chosen by a *task-specific router* (one
   router per task) that reads the task feature pooled over the image, with noisy top-k gating (the router also
   outputs a noise scale; PASCAL: top 9 of 15, the softmax's other entries zeroed without renormalising,
   `pre_softmax: False`; NYUD-v2 renormalises over the k, `pre_softmax: True`);
3. a *task-specific* low-rank expert per task (`spe_rank`), scaled by one more output of that task's router.

Because every path is linear in the feature, at inference the chosen experts and the task-specific expert are
re-parameterised, per sample, into the generic convolution (models/transformers/MLoRE_repara.py: the experts'
products W_e M_e are summed with the gate values into one "virtual" convolution, BatchNorm fused, the generic
convolution added): the cost does not grow with the number of experts. Training adds a load-balancing loss, the
squared coefficient of variation of the experts' mean gate values over the batch (every task's samples together),
summed over the MLoRE modules, weight 3e-4 (losses/loss_schemes.py, `load_balancing`; Shazeer et al.'s importance
loss).

Here, on the text pool (protocol (b), lorabench/harness/mixture.py: each example carries its task id), every adapted
linear W0 of the frozen language model becomes, for an example of task t with pooled input x̄ (the mean of its real
tokens' inputs to the layer: one routing decision per example, as MLoRE's is per image):

    [l, σ, m] = R_t x̄                                   (task t's router: E logits, E noise scales, 1 scale)
    p = softmax(l + ε ∘ σ), ε ~ N(0, I) while training   (noisy gating; no noise at evaluation)
    g = p on the top-k entries, 0 elsewhere               (renormalised over the k with `renormalize=true`)
    h = W0 x + s B_g A_g sg(x) + Σ_e g_e s B_e A_e x + m s B_t^spec A_t^spec x

with A_e of rank r_e (the experts' ranks differ), sg the stop-gradient of the released code's generic path, and one
scale s = alpha / (the largest rank of any path) for all paths. The frozen W0 plus the trainable task-sharing
low-rank generic path B_g A_g stand for the paper's generic convolution (a trainable full-rank generic path on every
linear of the language model would be full fine-tuning). The re-parameterisation is the same identity on a linear:
for an example's routing (g, m, t), h = W_merged x with

    W_merged = W0 + s B_g A_g + s Σ_e g_e B_e A_e + m s B_t^spec A_t^spec,

one linear per example; the trial records how far the mixture's output is from it (`reparam_max_abs_diff`). The
balancing loss is CV²(mean over the batch's examples of g) per layer, averaged over the adapted layers and weighted
by `balance_weight` (the released code sums over its 8 modules at weight 3e-4).

Not carried over from the vision setting: the convolutions' spatial kernels (3 x 3 experts and generic path), the
BatchNorms (on the experts' sum and on the module's output) and the GELU and 1 x 1 projection that follow the
module, the router's own network (a 1 x 1 convolution, LayerNorm and GELU before the pooling, plus a learned
spatial pooling; here a linear map of the mean token input), the task-specific projection of the backbone feature
into each task's feature (here every task reads the same hidden states; the router and the task-specific expert are
the task's own), the stacking of two modules at four backbone depths, and the dense-prediction tasks and heads.
A held-out task (task id -1, never trained) has no router of its own: its gate is the mean of the trained tasks'
gates on the example, and it has no task-specific expert. The routing reads the whole example (x̄), so it is not
causal: the multiple-choice scorer scores full sequences.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, MethodConfig, TrainState, replace_module, resolve_targets
from lorabench.methods.cross_task.mixture import MixtureMethod, Routing
from lorabench.methods.lora.layer import init_matrix


@dataclass
class MLoREConfig(MethodConfig):
    expert_ranks: list[int] = option(
        help="the task-sharing low-rank experts' ranks, one per expert (they differ: the paper's 15 experts have ranks "
             "16, 24, ..., 128)", default_factory=lambda: [1, 2, 3])
    top_k: int = option(2, "experts per example chosen by its task's router (the paper: 9 of 15)", low=1, high=256)
    generic_rank: int = option(4, "rank of the task-sharing generic path B_g A_g that every example goes through "
                                  "(gate 1; the widest path, as the paper's full-rank generic convolution); 0: the "
                                  "frozen W0 alone is the generic path", low=0, high=1024)
    specific_rank: int = option(1, "rank of each task's own task-specific expert (the paper's spe_rank)", low=1,
                                high=1024)
    tasks: int = option(6, "task-specific routers and experts per layer: task t's examples use router t and "
                           "expert t (set it to the number of training tasks)", low=1, high=4096)
    alpha: float = option(8.0, "every path's update is scaled by s = alpha / (the largest rank of any path)", low=0.0)
    renormalize: bool = option(False, "renormalise the top-k gate values to sum to 1 (the NYUD-v2 config's "
                                      "pre_softmax); false keeps the softmax's values, the others zeroed (PASCAL)")
    noisy: bool = option(True, "noisy top-k gating while training: the router's second E outputs scale Gaussian "
                               "noise added to the logits (the released code)")
    generic_stop_grad: bool = option(True, "the generic path reads a detached input (the released code's "
                                           "share_conv(out.detach())): its gradient trains B_g, A_g only")
    balance_weight: float = option(0.01, "weight of the load-balancing loss CV²(mean gate per expert) (averaged over "
                                         "layers; 0: none)", low=0.0)

    def __post_init__(self):
        if not self.expert_ranks or min(self.expert_ranks) < 1:
            raise ValueError(f"expert_ranks={self.expert_ranks} must list one positive rank per expert, e.g. "
                             f"[1, 2, 3]")
        if self.top_k > len(self.expert_ranks):
            raise ValueError(f"top_k={self.top_k} is more than the {len(self.expert_ranks)} experts of "
                             f"expert_ranks={self.expert_ranks}; use top_k <= {len(self.expert_ranks)}")
        if self.alpha == 0:
            raise ValueError("alpha=0 makes the update vanish; use a positive alpha")


class MLoRELinear(nn.Module):
    """A frozen linear W0 plus MLoRE's generic path, its routed low-rank experts of different ranks, and each task's
    router and task-specific expert (module docstring)."""

    PROBE_TOKENS = 8   # tokens of one example kept from the last training forward for the re-parameterisation check

    def __init__(self, base: nn.Linear, c: MLoREConfig, routing: Routing):
        super().__init__()
        self.base, self.c, self.routing = base, c, routing
        self.in_features, self.out_features = base.in_features, base.out_features
        k, d = self.in_features, self.out_features
        dt, dev = base.weight.dtype, base.weight.device
        self.E, self.ranks = len(c.expert_ranks), list(c.expert_ranks)
        self.scale = c.alpha / max(self.ranks + [c.generic_rank, c.specific_rank])
        R = sum(self.ranks)
        # experts: A_e stacked (R, k), B_e side by side (d, R), expert e owning rows/columns offset_e .. + r_e
        self.expert_A = nn.Parameter(torch.zeros(R, k, dtype=dt, device=dev))
        self.expert_B = nn.Parameter(torch.zeros(d, R, dtype=dt, device=dev))   # B = 0: the base model at init
        start = 0
        for r in self.ranks:
            init_matrix(self.expert_A.data[start:start + r], "kaiming", r)
            start += r
        self.register_buffer("expert_of_row", torch.repeat_interleave(torch.arange(self.E, device=dev),
                                                                      torch.tensor(self.ranks, device=dev)),
                             persistent=False)
        if c.generic_rank:
            self.generic_A = nn.Parameter(torch.zeros(c.generic_rank, k, dtype=dt, device=dev))
            self.generic_B = nn.Parameter(torch.zeros(d, c.generic_rank, dtype=dt, device=dev))
            init_matrix(self.generic_A.data, "kaiming", c.generic_rank)
        rs = c.specific_rank
        self.specific_A = nn.Parameter(torch.zeros(c.tasks * rs, k, dtype=dt, device=dev))   # task t: rows t*rs..
        self.specific_B = nn.Parameter(torch.zeros(d, c.tasks * rs, dtype=dt, device=dev))
        for t in range(c.tasks):
            init_matrix(self.specific_A.data[t * rs:(t + 1) * rs], "kaiming", rs)
        # task t's router R_t: (2E + 1, k): E logits, E noise scales, the task-specific expert's scale m
        self.router = nn.Parameter(torch.zeros(c.tasks, 2 * self.E + 1, k, dtype=dt, device=dev))
        for t in range(c.tasks):
            nn.init.kaiming_uniform_(self.router.data[t], a=math.sqrt(5))   # as nn.Linear's weight
        self.aux: torch.Tensor | None = None
        self.probe: tuple | None = None
        self.reset_stats()

    # -- routing ----------------------------------------------------------------------------------
    def _token_mask(self, x: torch.Tensor, pooled: bool) -> torch.Tensor:
        B, T = x.shape[0], x.shape[1]
        m = self.routing.mask
        if m is None or m.shape[0] != B or pooled:
            return torch.ones(B, T, device=x.device)
        return m[:, -T:].to(x.device, torch.float32)

    def task_ids(self, B: int) -> torch.Tensor:
        ids = self.routing.task_ids
        ids = torch.full((B,), self.routing.default_task, dtype=torch.long) if ids is None or ids.shape[0] != B \
            else ids
        if bool((ids >= self.c.tasks).any()):
            raise ValueError(f"task id {int(ids.max())} has no MLoRE router: this layer has {self.c.tasks} (tasks=); "
                             f"set tasks to the number of training tasks")
        return ids

    def gate(self, pooled: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Task `task[b]`'s router on example b's pooled input: (g (B, E), p (B, E), m (B,))."""
        E = self.E
        out = torch.einsum("bk,bok->bo", pooled.to(self.router.dtype), self.router[task])   # (B, 2E + 1)
        logits, sigma, m = out[:, :E], out[:, E:2 * E], out[:, 2 * E]
        if self.training and self.c.noisy:   # noisy gating: the released code adds randn * (the router's σ output)
            logits = logits + torch.randn_like(logits) * sigma
        p = torch.softmax(logits, -1)
        val, idx = p.topk(self.c.top_k, dim=-1)
        if self.c.renormalize:
            val = val / val.sum(-1, keepdim=True)
        g = torch.zeros_like(p).scatter(-1, idx, val)
        return g, p, m

    def route(self, x3: torch.Tensor, mask: torch.Tensor):
        """(g, p, m, ids) for the batch: each example's own task's router; a held-out example (-1) the mean of the
        trained tasks' gates and no task-specific expert."""
        B = x3.shape[0]
        ids = self.task_ids(B).to(x3.device)
        pooled = (x3 * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)   # x̄ (B, k)
        known = ids >= 0
        g, p, m = self.gate(pooled, ids.clamp(min=0))
        if not bool(known.all()):
            n = max(1, min(self.routing.trained_tasks, self.c.tasks))
            outs = [self.gate(pooled, torch.full_like(ids, t)) for t in range(n)]
            g_mean = torch.stack([o[0] for o in outs]).mean(0)
            p_mean = torch.stack([o[1] for o in outs]).mean(0)
            g = torch.where(known[:, None], g, g_mean)
            p = torch.where(known[:, None], p, p_mean)
            m = torch.where(known, m, torch.zeros_like(m))
        return g, p, m, ids

    # -- the three paths --------------------------------------------------------------------------
    def paths(self, x3: torch.Tensor, g: torch.Tensor, m: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """W0 x + s B_g A_g sg(x) + Σ_e g_e s B_e A_e x + m s B_t A_t x (module docstring), batched."""
        c, s = self.c, self.scale
        out = self.base(x3)
        if c.generic_rank:
            xg = x3.detach() if c.generic_stop_grad else x3
            out = out + s * F.linear(F.linear(xg, self.generic_A), self.generic_B)
        u = F.linear(x3, self.expert_A)                                   # (B, T, R): every A_e x at once
        w = g.to(u.dtype)[:, self.expert_of_row]                          # (B, R): g_e on each of e's r_e rows
        out = out + s * F.linear(u * w[:, None, :], self.expert_B)
        known = (ids >= 0).to(u.dtype)
        sel = F.one_hot(ids.clamp(min=0), c.tasks).to(u.dtype) * (known * m.to(u.dtype))[:, None]   # (B, tasks)
        ws = sel.repeat_interleave(c.specific_rank, dim=1)               # m on the example's own task's rows
        out = out + s * F.linear(F.linear(x3, self.specific_A) * ws[:, None, :], self.specific_B)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 2   # (B, k): BERT's pooler, one vector per example
        x3 = x[:, None, :] if squeeze else x
        mask = self._token_mask(x3, squeeze)
        g, p, m, ids = self.route(x3, mask)
        out = self.paths(x3, g, m, ids)
        self._record(g, p, m, ids)
        if self.training:
            imp = g.float().mean(0)                                        # mean gate per expert over the batch
            self.aux = imp.var() / imp.mean().clamp(min=1e-12) ** 2 if self.E > 1 else imp.sum() * 0.0   # CV²
            n = min(self.PROBE_TOKENS, x3.shape[1])
            # in the weights' dtype: under autocast x arrives in bf16, and reparam_error runs after training, outside it
            self.probe = (x3[0, :n].detach().to(self.expert_A.dtype), g[0].detach(), m[0].detach(), int(ids[0]))
        return out[:, 0] if squeeze else out

    # -- the re-parameterisation ------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight(self, g: torch.Tensor, m: torch.Tensor, task: int) -> torch.Tensor:
        """W_merged (d, k) of one routing decision (g (E,), m, task; -1: no task-specific expert):
        W0 + s B_g A_g + s Σ_e g_e B_e A_e + m s B_t A_t (MLoRE_repara.py's virtual convolution on a linear)."""
        c, s = self.c, self.scale
        W = self.base.weight.clone()
        if c.generic_rank:
            W += s * self.generic_B @ self.generic_A
        W += s * (self.expert_B * g.to(W.dtype)[self.expert_of_row]) @ self.expert_A
        if task >= 0:
            rows = slice(task * c.specific_rank, (task + 1) * c.specific_rank)
            W += s * float(m) * self.specific_B[:, rows] @ self.specific_A[rows]
        return W

    @torch.no_grad()
    def reparam_error(self) -> tuple[float, float] | None:
        """(max |mixture output - W_merged x|, the same over max |mixture output|) on the probe of the last training
        forward (its first example's first tokens and that example's routing, held fixed), both with the current
        weights: the mixture's three factorised paths as the forward computes them, against the one merged linear."""
        if self.probe is None:
            return None
        x, g, m, task = self.probe
        out = self.paths(x[None], g[None], m[None], torch.tensor([task], device=x.device))[0]
        merged = F.linear(x.to(self.base.weight.dtype), self.merged_weight(g, m, task), self.base.bias)
        diff = float((merged.float() - out.float()).abs().max())
        return diff, diff / max(float(out.float().abs().max()), 1e-12)

    # -- statistics -------------------------------------------------------------------------------
    @torch.no_grad()
    def _record(self, g, p, m, ids) -> None:
        s = self.stats
        for t in ids.unique().tolist():
            rows = ids == t
            key = int(t)
            st = s.setdefault(key, {"n": 0.0, "load": torch.zeros(self.E), "entropy": 0.0, "m": 0.0})
            st["n"] += float(rows.sum())
            st["load"] += g[rows].float().sum(0).cpu()
            st["entropy"] += float(-(p[rows].float().clamp(min=1e-12).log() * p[rows].float()).sum())
            st["m"] += float(m[rows].float().abs().sum())

    def reset_stats(self) -> None:
        self.stats: dict[int, dict] = {}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, expert_ranks={self.ranks}, top_k={self.c.top_k}, "
                f"generic_rank={self.c.generic_rank}, specific_rank={self.c.specific_rank}, tasks={self.c.tasks}")


class MLoRE(MixtureMethod):
    __doc__ = __doc__
    name = "mlore"
    title = "MLoRE: Multi-task dense prediction via mixture of low-rank experts"
    paper = "2403.17749"
    config_cls = MLoREConfig
    mechanism_metrics = {
        "expert_load": "per routed expert, its share of the gate mass Σ_examples g_e / Σ_examples Σ_e g_e, averaged "
                       "over layers (training)",
        "expert_load_by_task": "the same per task id of the training examples (each task has its own router)",
        "load_cv": "the coefficient of variation of expert_load over the experts of each layer, averaged over "
                   "layers (0 = perfectly balanced)",
        "router_entropy": "the routers' mean entropy per example of softmax(l + noise) before the top-k, in nats "
                          "(log E = uniform)",
        "specific_scale_by_task": "per task id, the mean |m| of its router's scale m of its task-specific expert "
                                  "(m is signed and unbounded, as in the released code), averaged over layers "
                                  "(0 for a held-out task: no task-specific expert)",
        "expert_ranks": "the routed experts' ranks r_1..r_E (they differ; the generic path's and the task-specific "
                        "experts' ranks are the options generic_rank and specific_rank)",
        "aux_loss_last": "the load-balancing loss CV²(mean gate per expert) at the last step, averaged over layers",
        "reparam_max_abs_diff": "max over layers of max |mixture output - W_merged x| at the end of training, on the "
                                "last training step's first example (8 tokens) at that example's routing, W_merged = "
                                "W0 + the generic path + the routed experts + the task-specific expert merged into "
                                "one linear (rounding level: the paths are linear)",
        "reparam_max_rel_diff": "the same difference over the largest |output| of that layer, max over layers",
    }

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        self.freeze_all_but_head(model, ctx)
        for name in resolve_targets(model, self.config.target_modules, ctx):
            replace_module(model, name, MLoRELinear(model.get_submodule(name), self.config, self.routing))
        model.register_forward_pre_hook(self.routing.hook, with_kwargs=True)
        return model

    def mixture_layers(self, model: nn.Module) -> list[MLoRELinear]:
        return [m for m in model.modules() if isinstance(m, MLoRELinear)]

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        losses = [m.aux for m in self.mixture_layers(state.model) if m.aux is not None]
        if not losses:
            return None
        aux = torch.stack(losses).mean()
        state.metrics["aux_loss_last"] = round(float(aux.detach()), 6)
        return self.config.balance_weight * aux if self.config.balance_weight > 0 else None

    def on_step_begin(self, state: TrainState) -> None:
        pass

    def on_train_begin(self, state: TrainState) -> None:
        for m in self.mixture_layers(state.model):
            m.reset_stats()
            m.probe = None

    def on_train_end(self, state: TrainState) -> None:
        layers = self.mixture_layers(state.model)
        errors = [e for e in (m.reparam_error() for m in layers) if e is not None]
        state.metrics.update(self.router_metrics(state.model))
        state.metrics.setdefault("aux_loss_last", 0.0)
        if errors:
            state.metrics["reparam_max_abs_diff"] = float(f"{max(e[0] for e in errors):.3g}")
            state.metrics["reparam_max_rel_diff"] = float(f"{max(e[1] for e in errors):.3g}")
        for m in layers:
            m.probe = None

    @torch.no_grad()
    def router_metrics(self, model: nn.Module, reset: bool = True) -> dict:
        """The experts' load (overall and per task id), its imbalance, the routers' entropy and the task-specific
        experts' scales, from the layers' counts since the last reset."""
        layers = self.mixture_layers(model)
        if not layers or not any(m.stats for m in layers):
            return {}
        E, c = layers[0].E, self.config
        load, cvs, ent, n_ex = torch.zeros(E), [], 0.0, 0.0
        by_task: dict[int, torch.Tensor] = {}
        scale: dict[int, float] = {}
        for m in layers:
            total = sum((st["load"] for st in m.stats.values()), torch.zeros(E))
            frac = total / total.sum().clamp(min=1e-12)
            load += frac
            cvs.append(float(frac.std(unbiased=False) / frac.mean().clamp(min=1e-12)) if E > 1 else 0.0)
            for t, st in m.stats.items():
                by_task[t] = by_task.get(t, torch.zeros(E)) + st["load"] / st["load"].sum().clamp(min=1e-12)
                scale[t] = scale.get(t, 0.0) + st["m"] / max(st["n"], 1.0)
                ent += st["entropy"]
                n_ex += st["n"]
            if reset:
                m.reset_stats()
        L = len(layers)
        key = lambda t: "held_out" if t < 0 else str(t)   # noqa: E731
        return {"expert_load": [round(float(x), 4) for x in load / L],
                "expert_load_by_task": {key(t): [round(float(x), 4) for x in v / L] for t, v in sorted(by_task.items())},
                "load_cv": round(sum(cvs) / len(cvs), 4),
                "router_entropy": round(ent / n_ex, 4) if n_ex else None,
                "specific_scale_by_task": {key(t): round(v / L, 4) for t, v in sorted(scale.items())},
                "expert_ranks": list(c.expert_ranks)}
