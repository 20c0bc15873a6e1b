"""MixLoRA (Shen et al.): Multimodal Instruction Tuning with Conditional Mixture of LoRA (arXiv 2402.15896).

Instance-conditioned factor selection (Shen et al., arXiv 2402.15896, sec. 3, "Dynamic Factor Selection"): a LoRA
update is a sum of rank-1 factors, ΔW = B A = Σ_j b_j a_j^T; MixLoRA keeps pools of E factors per layer, A-factors
a_1..a_E (rows, in_features each) and B-factors b_1..b_E (columns, out_features each), and builds each input
instance's own rank-r update from r of each:

- the condition is the instance's representation, the mean of its (real) tokens' inputs to the layer, x̄;
- Independent Factor Selection (IFS) picks A's factors: S_A = top-r of softmax(W_A x̄);
- Conditional Factor Selection (CFS) picks B's factors given A's choice: with the chosen A-factors a_{S_A(j)},
      p_B = softmax(W_B x̄) + λ Σ_j softmax(V_j a_{S_A(j)}),     S_B = top-r of p_B
  (V_j a linear map per selection slot j: the released code's `lora_a_param` condition, ifs_weight λ); with
  `conditional=false` B's factors are selected independently, like A's (top-r of softmax(W_B x̄));
- h = W0 x + s Σ_j w^B_j w^A_j b_{S_B(j)} a_{S_A(j)}^T x, the j-th chosen A-factor paired with the j-th chosen
  B-factor (in the order of the top-r), s = alpha / r.

The weights w are the selected probabilities renormalised over the r chosen (the released code's
`used_scored_weight` option): they give the routers a gradient. The paper's released training script turns them off
(`--used_scored_weight False`: a hard, unweighted selection, where the routers receive no gradient from the loss);
here they are on by default (`scored=true`) so that the routers learn; `scored=false` is the hard selection. The paper
adapts a multimodal model (LLaVA, Vision-Flan); here the selection runs on the text pool's SmolLM2. The
registered `mixlora` is a different paper of the same name (Li et al., arXiv 2404.15159: top-k LoRA experts).
The selection reads the whole example (x̄), so it is not causal: the multiple-choice scorer scores full sequences.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, MethodConfig, TrainState, replace_module, resolve_targets
from lorabench.methods.cross_task.mixture import MixtureMethod, Routing
from lorabench.methods.lora.layer import init_matrix


@dataclass
class MixLoRACFSConfig(MethodConfig):
    factors: int = option(16, "E: rank-1 factors in each pool (A's and B's) of every adapted layer", low=1, high=4096)
    rank: int = option(4, "r: factors selected from each pool per instance (the rank of its update)", low=1,
                       high=4096)
    alpha: float = option(8.0, "the selected update is scaled by alpha / rank (LoRA eq. (3))", low=0.0)
    dropout: float = option(0.0, "dropout on the factors' input", low=0.0, high=0.99)
    conditional: bool = option(True, "Conditional Factor Selection: B's factors are chosen given the chosen A-factors "
                                     "(false: independently, like A's)")
    ifs_weight: float = option(1.0, "λ: weight of the A-conditioned term in B's selection scores", low=0.0)
    scored: bool = option(True, "weigh each selected factor by its renormalised selection probability (the code's "
                                "used_scored_weight; gives the routers a gradient); false: hard, unweighted "
                                "selection, the released script's setting")

    def __post_init__(self):
        if self.rank > self.factors:
            raise ValueError(f"rank={self.rank} selects more factors than the pool holds (factors={self.factors}); "
                             f"use rank <= factors")
        if self.alpha == 0:
            raise ValueError("alpha=0 makes the update vanish; use a positive alpha")


class FactorSelectLinear(nn.Module):
    """A frozen linear plus pools of rank-1 factors and the two selection routers (module docstring)."""

    def __init__(self, base: nn.Linear, c: MixLoRACFSConfig, routing: Routing):
        super().__init__()
        self.base, self.c, self.routing = base, c, routing
        self.in_features, self.out_features = base.in_features, base.out_features
        self.E, self.r, self.scale = c.factors, c.rank, c.alpha / c.rank
        dt, dev = base.weight.dtype, base.weight.device
        k, d, E = self.in_features, self.out_features, c.factors
        self.lora_A = nn.Parameter(torch.zeros(E, k, dtype=dt, device=dev))   # (E, k): factor a_e in row e
        self.lora_B = nn.Parameter(torch.zeros(d, E, dtype=dt, device=dev))   # (d, E): factor b_e in column e; 0 at init
        init_matrix(self.lora_A.data, "kaiming", c.rank)
        self.router_A = nn.Linear(k, E, bias=False, dtype=dt, device=dev)    # W_A (IFS)
        self.router_B = nn.Linear(k, E, bias=False, dtype=dt, device=dev)    # W_B
        if c.conditional:
            self.cond_B = nn.Parameter(torch.zeros(c.rank, k, E, dtype=dt, device=dev))   # V_j, one per slot j
            nn.init.normal_(self.cond_B, 0.0, k ** -0.5)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = {"instances": 0.0, "used_A": torch.zeros(self.E), "used_B": torch.zeros(self.E),
                      "pairs": torch.zeros(self.E, self.E)}

    def condition(self, x: torch.Tensor) -> torch.Tensor:
        """x̄ (B, k): the mean of each example's real tokens' inputs (the `input` condition)."""
        m = self.routing.mask
        if x.dim() == 2:
            return x
        if m is None or m.shape[0] != x.shape[0]:
            return x.mean(1)
        m = m[:, -x.shape[1]:].to(x.dtype)[..., None]
        return (x * m).sum(1) / m.sum(1).clamp(min=1)

    @staticmethod
    def _top(scores: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the r largest scores (B, r), in descending order, and their renormalised weights."""
        val, idx = scores.topk(r, dim=-1)
        return idx, val / val.sum(-1, keepdim=True).clamp(min=torch.finfo(val.dtype).eps)

    def select(self, xbar: torch.Tensor):
        """(idx_A, w_A, idx_B, w_B), each (B, r): the chosen factors of each pool and their weights."""
        p_A = torch.softmax(self.router_A(xbar), -1)                           # IFS: softmax(W_A x̄)
        idx_A, w_A = self._top(p_A, self.r)
        p_B = torch.softmax(self.router_B(xbar), -1)                           # softmax(W_B x̄)
        if self.c.conditional:   # CFS: + λ Σ_j softmax(V_j a_{S_A(j)})
            a_sel = self.lora_A[idx_A]                                         # (B, r, k) the chosen A-factors
            cond = torch.softmax(torch.einsum("brk,rke->bre", a_sel, self.cond_B), -1).sum(1)   # (B, E)
            p_B = p_B + self.c.ifs_weight * cond
            idx_B, w_B = self._top(p_B, self.r)
        else:
            idx_B, w_B = self._top(p_B, self.r)
        return idx_A, w_A, idx_B, w_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 2
        x3 = x[:, None, :] if squeeze else x                                  # (B, T, k)
        idx_A, w_A, idx_B, w_B = self.select(self.condition(x3))
        if not self.c.scored:
            w_A, w_B = torch.ones_like(w_A), torch.ones_like(w_B)
        A = self.lora_A[idx_A] * w_A[..., None]                                # (B, r, k): w^A_j a_{S_A(j)}
        Bm = self.lora_B.T[idx_B] * w_B[..., None]                             # (B, r, d): w^B_j b_{S_B(j)}
        h = F.dropout(x3, self.c.dropout, self.training) if self.c.dropout > 0 else x3
        u = torch.einsum("btk,brk->btr", h, A)                                 # (B, T, r)
        out = self.base(x3) + self.scale * torch.einsum("btr,brd->btd", u, Bm)  # W0 x + s Σ_j b_j a_j^T x
        self._record(idx_A, idx_B)
        return out[:, 0] if squeeze else out

    @torch.no_grad()
    def _record(self, idx_A: torch.Tensor, idx_B: torch.Tensor) -> None:
        s = self.stats
        s["instances"] += idx_A.shape[0]
        s["used_A"] += torch.bincount(idx_A.flatten().cpu(), minlength=self.E).float()
        s["used_B"] += torch.bincount(idx_B.flatten().cpu(), minlength=self.E).float()
        s["pairs"].index_put_((idx_A.flatten().cpu(), idx_B.flatten().cpu()),
                              torch.ones(idx_A.numel()), accumulate=True)

    def delta_weight_for(self, idx_A, w_A, idx_B, w_B) -> torch.Tensor:
        """s Σ_j w^B_j w^A_j b_{S_B(j)} a_{S_A(j)}^T (d, k) of one instance (1-D index and weight vectors)."""
        return self.scale * (self.lora_B[:, idx_B] * (w_A * w_B)) @ self.lora_A[idx_A]

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, factors={self.E}, rank={self.r}, "
                f"conditional={self.c.conditional}")


class MixLoRACFS(MixtureMethod):
    __doc__ = __doc__
    name = "mixlora-cfs"
    title = "MixLoRA: Multimodal instruction tuning with conditional mixture of LoRA"
    paper = "2402.15896"
    config_cls = MixLoRACFSConfig
    default_lr = 5e-4
    mechanism_metrics = {
        "factor_usage_A": "per A-factor of the pool, the fraction of instances that selected it (each selects r), "
                          "averaged over layers (training)",
        "factor_usage_B": "the same for the B-factors",
        "factors_used_fraction": "the fraction of the pools' factors (A and B, every layer) selected at least once",
        "usage_cv": "the coefficient of variation of the A- and B-factor usage over a pool, averaged over layers and "
                    "the two pools (0 = every factor equally used)",
        "distinct_pairs": "distinct (A-factor, B-factor) pairs used, averaged over layers (at most factors^2)",
    }

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        import re
        self.freeze_all_but_head(model, ctx)
        for name in resolve_targets(model, self.config.target_modules, ctx):
            layer = FactorSelectLinear(model.get_submodule(name), self.config, self.routing)
            m = re.search(r"\.(\d+)\.", name)
            layer.depth = int(m.group(1)) if m else 0
            replace_module(model, name, layer)
        model.register_forward_pre_hook(self.routing.hook, with_kwargs=True)
        return model

    def mixture_layers(self, model: nn.Module) -> list[FactorSelectLinear]:
        return [m for m in model.modules() if isinstance(m, FactorSelectLinear)]

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        return None            # the paper adds no balancing loss

    def on_step_begin(self, state: TrainState) -> None:
        pass                   # no teacher forcing

    def on_train_end(self, state: TrainState) -> None:
        state.metrics.update(self.router_metrics(state.model))

    def router_metrics(self, model: nn.Module, reset: bool = True) -> dict:
        layers = [m for m in self.mixture_layers(model) if m.stats["instances"]]
        if not layers:
            return {}
        E = layers[0].E
        use_A, use_B, cvs, used, pairs = torch.zeros(E), torch.zeros(E), [], 0, 0
        for m in layers:
            s = m.stats
            fa, fb = s["used_A"] / s["instances"], s["used_B"] / s["instances"]   # fraction of instances per factor
            use_A += fa
            use_B += fb
            cvs += [float(f.std(unbiased=False) / f.mean().clamp(min=1e-12)) for f in (fa, fb)]
            used += int((s["used_A"] > 0).sum() + (s["used_B"] > 0).sum())
            pairs += int((s["pairs"] > 0).sum())
            if reset:
                m.reset_stats()
        n = len(layers)
        return {"factor_usage_A": [round(float(v), 4) for v in use_A / n],
                "factor_usage_B": [round(float(v), 4) for v in use_B / n],
                "factors_used_fraction": round(used / (2 * E * n), 4),
                "usage_cv": round(sum(cvs) / len(cvs), 4),
                "distinct_pairs": round(pairs / n, 2)}
