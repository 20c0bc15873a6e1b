"""LoRAShear: Efficient Large Language Model Structured Pruning and Knowledge Recovery
(Chen et al., arXiv 2310.18356).

LoRAShear prunes whole structures of a LoRA-equipped model while LoRA fine-tunes it, with the
LoRA Half-Space Projected Gradient (LHSPG, Algorithm 2 of the paper) as the optimiser of the
structured-sparsity problem  min_{A,B} f(A, B)  s.t.  Card{g in G : [x]_g = 0} = K,
where x are the model's variables (the frozen weights plus the merged LoRA update) and G are the
minimally removable structures found by the dependency graph (sec. 3.1).

What applies to our harness:

- Groups (sec. 3.1, the minimally removable structures): the channels of each feed-forward block.
  A channel is the row of the block's input projections (Llama: gate_proj and up_proj together;
  BERT: intermediate.dense) with its bias, and the matching column of the output projection
  (down_proj / output.dense), which becomes dead when the row is zero. With `head_sparsity` > 0
  the attention heads are groups too (BERT: a head's rows of query/key/value and columns of the
  output dense; Llama: a key/value head with the query heads that read it, and their o_proj
  columns), pruned in their own pool with their own target. The variable of group g is
  x_g = m_g [W + s B A | b]_g over the input projections, where m_g is a per-group factor on the
  layer output (a buffer, so the frozen weights are never written; m = 1 until g is redundant).
  The paper's knowledge-distribution analysis (marking the most important layers unprunable) is
  not done; every block keeps at least one group.
- LHSPG (Algorithm 2): after `prune_start_ratio` of the steps of plain LoRA warm-up, the pruning
  window is split into `periods` periods of T steps. At the start of period p the K/P groups of
  lowest saliency among the still-important ones become redundant (G_R^p).
  Within the period, at inner step t, A and B take their AdamW step (this carries the
  knowledge of the redundant groups over to the important ones), then each redundant group
  takes the trial iterate  x~ = (1 - lambda_t) x_{t+1/2}  with the forget rate
  lambda_t = 1 / (T - t) (the schedule of the authors' LHSPG, only_train_once/optimizer/lhspg.py,
  which reaches exactly zero at the period's last step), followed by the half-space projection
  (HSPG):  [x_{t+1}]_g = 0  if  x~_g . x_{t,g} < eps ||x_{t,g}||^2,  else x~_g.
  A zeroed group stays zero (its B rows and their optimiser moments are zeroed).
- Saliency score (sec. 3.3, the LoRA proxies of the authors' implementation): the group's
  magnitude ||x_g||, average magnitude ||x_g|| / |g|, cosine similarity cos(x_g, [s B A]_g) + 1,
  and first/second-order Taylor terms |x_g . [s B A]_g| and (x_g . [s B A]_g)^2 / 2, where the
  trained LoRA product s B A stands in for the (accumulated) gradient of x; each proxy is
  normalised by its L2 norm over all groups and the proxies are averaged.
- Knowledge recovery (sec. 3.4): the steps after the pruning window keep fine-tuning LoRA on the
  pruned model. The paper's dynamic mix of pre-training and instruction data does not apply to a
  single-task benchmark: recovery uses the task's training data.

Pruned groups are masked (m = 0): they output zero, so removing them (their rows of the input
projections and columns of the output projection, `remove_pruned_channels`) leaves the function
unchanged. The masks are saved with the adapter. The record carries the target and achieved
group sparsity, the groups pruned, and the backbone's parameter count before and after removal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState, replace_module
from lorabench.methods.lora import LoRA, LoraConfig
from lorabench.methods.lora.layer import LoraLinear
from lorabench.methods.efficiency_pruning.loraprune import CHANNEL_GROUPS, ChannelMaskVariant

OUTPUT_PROJECTION = {"llama": "down_proj", "bert": "output.dense"}  # consumes the channels, relative to the block
SALIENCY = {  # weights of the saliency proxies (the authors' default weighs them equally)
    "combined": {"magnitude": 0.2, "avg_magnitude": 0.2, "cosine": 0.2, "taylor1": 0.2, "taylor2": 0.2},
    "magnitude": {"magnitude": 1.0},
    "taylor": {"taylor1": 1.0},
}


@dataclass
class LoraShearConfig(LoraConfig):
    sparsity: float = option(0.2, "target group sparsity K / |G|: fraction of the feed-forward channels pruned "
                                  "(the paper prunes 20% and 50% of LLaMA)", low=0.0, high=0.95)
    head_sparsity: float = option(0.0, "fraction of the attention heads pruned as well (Llama: key/value heads with "
                                       "their query heads); 0 = heads are not pruned. Needs the q/k/v projections "
                                       "adapted", low=0.0, high=0.95)
    prune_start_ratio: float = option(0.1, "fraction of the steps of LoRA warm-up before LHSPG starts pruning "
                                           "(Algorithm 2's warm-up)", low=0.0, high=1.0)
    prune_end_ratio: float = option(0.6, "fraction of the steps by which every redundant group is zero; the steps "
                                         "after it are knowledge recovery (plain LoRA on the pruned model)",
                                    low=0.0, high=1.0)
    periods: int = option(5, "number P of pruning periods; each makes K/P more groups redundant and drives them "
                             "to zero (Algorithm 2); at most the number of steps in the pruning window", low=1)
    epsilon: float = option(0.0, "half-space projection threshold eps in [0, 1): a redundant group is projected to "
                                 "zero as soon as its trial iterate x~ has x~ . x < eps ||x||^2", low=0.0, high=0.999)
    saliency: Literal["combined", "magnitude", "taylor"] = option(
        "combined", "saliency score that picks the redundant groups: 'combined' (normalised magnitude, average "
                    "magnitude, cosine similarity and first/second-order Taylor terms with the LoRA product as the "
                    "gradient proxy, equally weighted), 'magnitude' (||x_g||) or 'taylor' (|x_g . [s B A]_g|)",
        choices=["combined", "magnitude", "taylor"])

    def __post_init__(self):
        super().__post_init__()
        if self.prune_start_ratio >= self.prune_end_ratio:
            raise ValueError(f"prune_start_ratio ({self.prune_start_ratio}) must be below prune_end_ratio "
                             f"({self.prune_end_ratio}): pruning happens between them")
        if self.kernel == "fused":
            raise ValueError("lorashear scales the layer output per channel in its own forward: use kernel='reference'")


# -- the paper's equations on tensors ---------------------------------------------------------------

def saliency_scores(x: torch.Tensor, d: torch.Tensor, kind: str = "combined") -> torch.Tensor:
    """Saliency of each group (row) of x (G, n) given the LoRA gradient proxy d = [s B A]_g (G, n):
    each proxy normalised by its L2 norm over the groups, then weighted (sec. 3.3)."""
    if kind not in SALIENCY:
        raise ValueError(f"unknown saliency {kind!r}; valid: {', '.join(SALIENCY)}")
    norm_x, norm_d = x.norm(dim=1), d.norm(dim=1)
    inner = (x * d).sum(dim=1)
    proxies = {
        "magnitude": norm_x,                                   # ||x_g||
        "avg_magnitude": norm_x / x.shape[1],                  # ||x_g|| / |g|
        "cosine": inner / (norm_x + 1e-8) / (norm_d + 1e-8) + 1,  # cos(x_g, d_g) + 1
        "taylor1": inner.abs(),                                # |x_g . d_g|, first-order Taylor
        "taylor2": 0.5 * inner ** 2,                           # (x_g . d_g)^2 / 2, second-order Taylor
    }
    score = torch.zeros_like(norm_x)
    for name, w in SALIENCY[kind].items():
        p = proxies[name]
        score = score + w * p / (p.norm() + 1e-8)
    return score


def forget_rate(t: int, period_steps: int) -> float:
    """lambda_t = 1 / (T - t): (1 - lambda_t) shrinks a redundant group so that it is exactly zero after the
    period's last inner step t = T - 1 (LHSPG's trial iterate, Algorithm 2)."""
    if not 0 <= t < period_steps:
        raise ValueError(f"inner step t={t} outside the period of {period_steps} steps")
    return 1.0 / (period_steps - t)


def halfspace_zero(x_trial: torch.Tensor, x_prev: torch.Tensor, eps: float) -> torch.Tensor:
    """Groups (rows) that the half-space projection sends to zero: x~_g . x_g < eps ||x_g||^2 (HSPG, Algorithm 2)."""
    return (x_trial * x_prev).sum(dim=1) < eps * (x_prev * x_prev).sum(dim=1)


def lhspg_step(x_prev: torch.Tensor, x_half: torch.Tensor, t: int, period_steps: int,
               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One LHSPG step on the redundant groups: trial iterate x~ = (1 - lambda_t) x_{t+1/2} (x_{t+1/2}: after
    the LoRA step), then the half-space projection against x_t. Returns (x_{t+1}, zeroed)."""
    x_trial = (1.0 - forget_rate(t, period_steps)) * x_half          # trial iterate of Algorithm 2
    zeroed = halfspace_zero(x_trial, x_prev, eps)                    # half-space projection of Algorithm 2
    return x_trial.masked_fill(zeroed[:, None], 0.0), zeroed


def period_sizes(k: int, periods: int) -> list[int]:
    """Redundant groups added in each period: K // P, the last one takes the remainder."""
    return [k // periods] * (periods - 1) + [k - (k // periods) * (periods - 1)]


# -- the model side ---------------------------------------------------------------------------------

class GroupSet:
    """Minimally removable structures of one block that share one mask (sec. 3.1): the channels of a feed-forward
    block, or the heads of an attention block. Group g owns rows `rows[l][g]` of each input projection l (with
    their biases) and columns `cols[g]` of the output projection, which are dead once the rows are zero."""

    def __init__(self, kind: str, name: str, inputs: list[tuple[str, LoraLinear, torch.Tensor]],
                 output: tuple[str, nn.Module, torch.Tensor] | None):
        self.kind, self.name = kind, name
        self.input_names = [n for n, _, _ in inputs]
        self.inputs = [m for _, m, _ in inputs]
        self.rows = [r for _, _, r in inputs]                      # (G, rows per group) per input projection
        self.output_name, self.output, self.cols = output if output is not None else (None, None, None)

    @property
    def size(self) -> int:
        return self.rows[0].shape[0]

    @property
    def mask(self) -> torch.Tensor:
        """m_g per group (the mask of the group's first row)."""
        return self.inputs[0].channel_mask[self.rows[0][:, 0]]

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        for m, rows in zip(self.inputs, self.rows):
            m.channel_mask[rows.flatten()] = mask[:, None].expand_as(rows).flatten().to(m.channel_mask.dtype)

    @torch.no_grad()
    def variables(self, idx: torch.Tensor, masked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, d) of the groups idx: x = m [W + s B A | b] over the input projections, d = [s B A | 0]."""
        xs, ds = [], []
        for m, rows in zip(self.inputs, self.rows):
            r = rows[idx].flatten()
            delta = m.scale * m.lora_B[r] @ m.lora_A
            x = m.base.weight[r] + delta
            if m.base.bias is not None:
                x = torch.cat([x, m.base.bias[r, None]], dim=1)
                delta = torch.cat([delta, torch.zeros_like(delta[:, :1])], dim=1)
            if masked:
                x = x * m.channel_mask[r, None]
            xs.append(x.reshape(len(idx), -1))
            ds.append(delta.reshape(len(idx), -1))
        return torch.cat(xs, dim=1).float(), torch.cat(ds, dim=1).float()

    def weights_per_group(self) -> int:
        """Backbone parameters one group owns: its rows (and biases) of the inputs, its output columns."""
        n = sum(rows.shape[1] * (m.in_features + (m.base.bias is not None)) for m, rows in zip(self.inputs, self.rows))
        if self.output is not None:
            out = self.output.base if isinstance(self.output, LoraLinear) else self.output
            n += self.cols.shape[1] * out.out_features
        return n


def backbone_parameters(model: nn.Module) -> int:
    """Parameters of the model once the adapters are merged (LoRA factors excluded)."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n.rsplit(".", 1)[-1])


@torch.no_grad()
def remove_pruned_channels(model: nn.Module, method: "LoraShear") -> nn.Module:
    """Merge the adapters and physically drop the masked groups: their rows (and biases) of the input projections
    and columns of the output projection (the attention reshapes with -1 heads, so fewer heads just work).
    Returns the smaller plain model (for export); the function is unchanged because a masked group outputs
    zero. `model` is the adapted model or a copy of it (modules are looked up by name)."""
    method.merge(model)
    for gs in method.sets:
        inputs = [model.get_submodule(n) for n in gs.input_names]
        kept = (inputs[0].channel_mask[gs.rows[0][:, 0]] != 0).nonzero().flatten()
        for name, m, rows in zip(gs.input_names, inputs, gs.rows):
            keep = rows[kept].flatten()
            new = nn.Linear(m.in_features, len(keep), bias=m.base.bias is not None,
                            dtype=m.base.weight.dtype, device=m.base.weight.device)
            new.weight.copy_(m.base.weight[keep])   # merged: m (W + s B A), exactly W + s B A on kept rows
            if m.base.bias is not None:
                new.bias.copy_(m.base.bias[keep])
            replace_module(model, name, new)
        if gs.output_name is not None:
            out = model.get_submodule(gs.output_name)
            out = out.base if isinstance(out, LoraLinear) else out
            keep = gs.cols[kept].flatten()
            new = nn.Linear(len(keep), out.out_features, bias=out.bias is not None,
                            dtype=out.weight.dtype, device=out.weight.device)
            new.weight.copy_(out.weight[:, keep])
            if out.bias is not None:
                new.bias.copy_(out.bias)
            replace_module(model, gs.output_name, new)
    return model


HeadSet = tuple[str, list[tuple[str, torch.Tensor]], tuple[str, torch.Tensor]]


def head_sets(model: nn.Module, arch: str) -> list[HeadSet]:
    """Attention heads as groups: (block, [(input suffix, rows)], (output name, cols)). Llama (grouped-query):
    one group is a key/value head with the query heads that read it; BERT: one head."""
    out = []
    for name, m in model.named_modules():
        if arch == "llama" and all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            d, rep = m.head_dim, m.num_key_value_groups
            g = m.k_proj.out_features // d
            q = torch.arange(g * rep * d).reshape(g, rep * d)
            kv = torch.arange(g * d).reshape(g, d)
            out.append((name, [("q_proj", q), ("k_proj", kv), ("v_proj", kv)], (f"{name}.o_proj", q)))
        elif arch == "bert" and all(hasattr(m, a) for a in ("query", "key", "value", "attention_head_size")):
            d = m.attention_head_size
            h = torch.arange(m.query.out_features).reshape(-1, d)
            parent = name.rsplit(".", 1)[0]      # BertAttention: .self holds q/k/v, .output.dense the projection
            out.append((name, [("query", h), ("key", h), ("value", h)], (f"{parent}.output.dense", h)))
    return out


class LoraShear(LoRA):
    name = "lorashear"
    title = "LoRAShear: Efficient Large Language Model Structured Pruning and Knowledge Recovery"
    paper = "2310.18356"
    family = "efficiency-pruning"
    config_cls = LoraShearConfig
    mechanism_metrics = {
        "group_sparsity": "fraction of the minimally removable structures zeroed by LHSPG",
        "param_reduction": "fraction of the backbone's parameters removed",
        "periods": "LHSPG pruning periods run",
    }
    # LoRA's default; the paper fine-tunes LLaMA's LoRA with AdamW at a learning rate in this range
    default_lr = 5e-4

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        model = super().apply(model, ctx)
        arch = ctx.architecture
        suffixes = CHANNEL_GROUPS.get(arch)
        if not suffixes:
            raise ValueError(f"lorashear knows the structures of {', '.join(CHANNEL_GROUPS)}, not {arch!r}")
        named = dict(model.named_modules())

        def adapted(name: str) -> LoraLinear:
            m = named.get(name)
            if not isinstance(m, LoraLinear):
                raise ValueError(f"lorashear prunes through the LoRA layer of {name}, which is not adapted: "
                                 f"target_modules must cover it (or leave target_modules unset for every linear)")
            if not isinstance(m.variant, ChannelMaskVariant):
                m.variant = ChannelMaskVariant()   # h = m ⊙ (W x + b + s B A x): the group factor m_g per row
                m.variant.init(m)
            return m

        def output(name: str, cols: torch.Tensor):
            return (name, named[name], cols) if name in named else None

        self.blocks: list[GroupSet] = []   # feed-forward channels
        first = suffixes[0]
        for name in [n for n in named if n.endswith("." + first)]:
            block = name[: -len(first) - 1]
            n_ch = named[name].out_features
            rows = torch.arange(n_ch)[:, None]
            ins = [(f"{block}.{s}", adapted(f"{block}.{s}"), rows) for s in suffixes]
            self.blocks.append(GroupSet("channel", block, ins, output(f"{block}.{OUTPUT_PROJECTION[arch]}", rows)))
        if not self.blocks:
            raise ValueError(f"lorashear: no feed-forward block ({', '.join(suffixes)}) in this {arch} model")
        self.heads: list[GroupSet] = []    # attention heads, only when they are pruned
        if self.config.head_sparsity > 0:
            for block, ins, (out_name, cols) in head_sets(model, arch):
                self.heads.append(GroupSet("head", block, [(f"{block}.{s}", adapted(f"{block}.{s}"), r)
                                                           for s, r in ins], output(out_name, cols)))
        self.sets = self.blocks + self.heads
        return model

    # -- LHSPG ------------------------------------------------------------------------------------
    def on_train_begin(self, state: TrainState) -> None:
        c, n = self.config, state.total_steps
        self.start, end = round(c.prune_start_ratio * n), round(c.prune_end_ratio * n)
        window = end - self.start
        if window < 1:
            raise ValueError(f"lorashear: the pruning window [{c.prune_start_ratio}, {c.prune_end_ratio}) of "
                             f"{n} steps holds no step; widen it or train longer")
        self.n_periods = min(c.periods, window)                     # P
        self.period_steps = window // self.n_periods                # T
        # one pool per kind of structure, each with its own target K (channels and heads differ in size)
        self.pools = {"channel": (self.blocks, c.sparsity), "head": (self.heads, c.head_sparsity)}
        self.targets = {k: int(sp * sum(g.size for g in sets)) for k, (sets, sp) in self.pools.items()}
        self.target = self.targets["channel"]
        self.sizes = {k: period_sizes(K, self.n_periods) for k, K in self.targets.items()}
        self.pruned = {id(g): torch.zeros(g.size, dtype=torch.bool) for g in self.sets}
        self.redundant = {id(g): torch.zeros(g.size, dtype=torch.bool) for g in self.sets}
        self.early_projections = 0
        self.params_before = backbone_parameters(state.model)

    def phase(self, step: int) -> tuple[int, int] | None:
        """(period p, inner step t) of a step in the pruning window, None outside it."""
        k = step - self.start
        if k < 0 or k >= self.n_periods * self.period_steps:
            return None
        return k // self.period_steps, k % self.period_steps

    @torch.no_grad()
    def identify_redundant(self, sets: list[GroupSet], count: int) -> None:
        """Algorithm 2: the `count` important groups of least saliency join G_R. A block keeps at least
        one group (a layer without heads or channels would not run once they are removed)."""
        if not sets or count <= 0:
            return
        xs, ds = zip(*(g.variables(torch.arange(g.size)) for g in sets))
        score = saliency_scores(torch.cat(xs), torch.cat(ds), self.config.saliency)
        owner = torch.cat([torch.full((g.size,), i) for i, g in enumerate(sets)])
        local = torch.cat([torch.arange(g.size) for g in sets])
        left = [int((~(self.pruned[id(g)] | self.redundant[id(g)])).sum()) for g in sets]
        for j in torch.argsort(score).tolist():
            if count == 0:
                break
            g = sets[int(owner[j])]
            taken = self.pruned[id(g)] | self.redundant[id(g)]
            if taken[local[j]] or left[int(owner[j])] <= 1:
                continue
            self.redundant[id(g)][local[j]] = True
            left[int(owner[j])] -= 1
            count -= 1

    def on_step_begin(self, state: TrainState) -> None:
        ph = self.phase(state.step)
        if ph is None:
            return
        p, t = ph
        if t == 0:
            for kind, (sets, _) in self.pools.items():
                self.identify_redundant(sets, self.sizes[kind][p])
        # x_t of the redundant groups, before the optimizer moves A and B
        self.x_prev = {id(g): g.variables(self.redundant[id(g)].nonzero().flatten())[0] for g in self.sets
                       if self.redundant[id(g)].any()}

    @torch.no_grad()
    def on_step_end(self, state: TrainState) -> None:
        ph = self.phase(state.step)
        if ph is not None:
            p, t = ph
            lam = forget_rate(t, self.period_steps)
            for g in self.sets:
                idx = self.redundant[id(g)].nonzero().flatten()
                if len(idx) == 0:
                    continue
                x_half = g.variables(idx)[0]                                 # after the LoRA step
                _, zeroed = lhspg_step(self.x_prev[id(g)], x_half, t, self.period_steps, self.config.epsilon)
                mask, alive = g.mask.clone(), g.mask[idx] != 0
                # x_{t+1} = (1 - lambda_t) x_{t+1/2}: the factor m carries the shrink of the whole row W + s B A | b
                mask[idx] = torch.where(zeroed, torch.zeros_like(mask[idx]), mask[idx] * (1.0 - lam))
                if t < self.period_steps - 1:
                    self.early_projections += int((zeroed & alive).sum())   # zeroed before the period's end
                g.set_mask(mask)
            if t == self.period_steps - 1:                                   # G_R^p is exactly zero: commit
                for g in self.sets:
                    self.pruned[id(g)] |= self.redundant[id(g)]
                    self.redundant[id(g)][:] = False
        self.zero_pruned(state.optimizer)

    @torch.no_grad()
    def zero_pruned(self, optimizer) -> None:
        """Zero groups stay zero: their B rows and the optimizer moments of those rows."""
        for m in {id(m): m for g in self.sets for m in g.inputs}.values():
            rows = m.channel_mask == 0
            if not rows.any():
                continue
            m.lora_B[rows] = 0
            st = optimizer.state.get(m.lora_B, {}) if optimizer is not None else {}
            for v in st.values():
                if torch.is_tensor(v) and v.shape == m.lora_B.shape:
                    v[rows] = 0

    def on_train_end(self, state: TrainState) -> None:
        before = getattr(self, "params_before", backbone_parameters(state.model))
        removed = 0
        metrics = {"target_sparsity": self.config.sparsity}
        for kind, sets, label in (("channel", self.blocks, "groups"), ("head", self.heads, "heads")):
            if kind == "head" and not sets:
                continue
            zero = [int((g.mask == 0).sum()) for g in sets]
            removed += sum(z * g.weights_per_group() for z, g in zip(zero, sets))
            total = sum(g.size for g in sets)
            prefix = "" if kind == "channel" else "head_"
            metrics |= {f"{prefix}group_sparsity": round(sum(zero) / max(1, total), 4),
                        f"{label}_pruned": sum(zero), f"{label}_total": total}
        if self.heads:
            metrics["target_head_sparsity"] = self.config.head_sparsity
        metrics |= {"params_before": before, "params_after": before - removed,
                    "param_reduction": round(removed / max(1, before), 4),
                    "periods": getattr(self, "n_periods", 0),
                    "early_halfspace_projections": getattr(self, "early_projections", 0)}
        state.metrics.update(metrics)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().adapter_state_dict(model)
        state.update({n: b.detach() for n, b in model.named_buffers() if n.endswith("channel_mask")})
        return state
