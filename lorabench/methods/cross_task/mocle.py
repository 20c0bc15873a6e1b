"""MoCLE: Mixture of Cluster-conditional LoRA Experts for Vision-language Instruction Tuning (arXiv 2312.12379).

Experts activated by clusters of instruction embeddings, plus a universal expert (Gou et al., arXiv 2312.12379,
sec. 3; the released code, gyhdog99/MoCLE, peft-main/src/peft/tuners/lora/layer.py):

1. the training instructions are embedded and clustered by k-means into K clusters, once, before training;
2. an example goes to the cluster of the nearest centroid; each cluster k has a learnt embedding C_k, and the gate is
       p = softmax((W_g C_k + b_g + ε) / τ)     over the E cluster-conditional experts (ε ~ N(0, σ²) while training),
   of which the top-1 expert i is activated with w = p_i;
3. a universal expert G, trained on every example, is mixed in:
       h = W0 x + w · (w s B_i A_i x) + (1 - w) · s B_G A_G x
   as the released code computes it (its dispatcher multiplies the expert's output by its gate w, then the mix
   `y_e * w + y_g * (1 - w)` multiplies it by w again).

The paper embeds the instruction text with all-MiniLM-L6-v2; here an example's embedding is the mean of the model's
own (frozen) input embeddings over its real tokens, L2-normalised, so that the clustering needs no second model and
routes the same sequence the same way in training and in scoring. The k-means (scipy's kmeans2, k-means++ init,
seeded) is fitted on the first `fit_examples` training examples (those batches are then trained on as usual), and
each cluster's purity against the examples' task ids is recorded (protocol (b) passes them as `task_ids`; they are
never used for routing). The embedding reads the whole example, so scoring with a key-value cache of a prompt is
refused; the multiple-choice scorer then scores full sequences.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState, replace_module, resolve_targets
from lorabench.methods.cross_task.mixture import MixtureLinear, MixtureMethod, config_with

# 1 universal + 4 cluster-conditional experts of rank 4 (the budget of suites/mixture.yaml's mixtures)
_Defaults = config_with("_MoCLEDefaults", __name__, router="task", experts=5, rank=4)


@dataclass
class MoCLEConfig(_Defaults):
    clusters: int = option(8, "K: k-means clusters of the instruction embeddings (each a learnt embedding the gate "
                              "reads)", low=1, high=4096)
    fit_examples: int = option(256, "training examples the k-means is fitted on (the first batches of the training "
                                    "stream)", low=1)
    temperature: float = option(1.0, "τ: softmax temperature of the gate (the code's gates_tmp)", low=1e-3, high=1e3)
    gate_noise: float = option(0.1, "σ: std of the Gaussian noise on the gate's logits while training (the code's "
                                    "noise_std)", low=0.0)
    universal: bool = option(True, "a universal expert (expert 0) mixed in with weight 1 - w; false: the "
                                   "cluster-conditional experts alone")

    def __post_init__(self):
        if self.router != "task":
            raise ValueError(f"mocle's gate reads the example's cluster embedding (router=task); router={self.router!r} "
                             f"is not that")
        if self.experts < (2 if self.universal else 1):
            raise ValueError(f"experts={self.experts}: mocle needs the universal expert plus at least one "
                             f"cluster-conditional expert")
        if self.fit_examples < self.clusters:
            raise ValueError(f"fit_examples={self.fit_examples} cannot form clusters={self.clusters} clusters; use "
                             f"fit_examples >= clusters")
        self.n_tasks = self.clusters          # the gate's embedding table: one row per cluster
        super().__post_init__()


class ClusterIndex(nn.Module):
    """The k-means centroids (saved with the adapter) and the assignment of an example to its nearest one."""

    def __init__(self, clusters: int, dim: int, dtype, device):
        super().__init__()
        self.register_buffer("centroids", torch.zeros(clusters, dim, dtype=dtype, device=device))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool, device=device))

    def assign(self, emb: torch.Tensor) -> torch.Tensor:
        """(B,) the nearest centroid of each (normalised) embedding; cluster 0 before the k-means is fitted."""
        if not bool(self.fitted):
            return torch.zeros(emb.shape[0], dtype=torch.long, device=emb.device)
        return torch.cdist(emb.float(), self.centroids.float()).argmin(-1)


class MoCLELinear(MixtureLinear):
    """The mixture layer with MoCLE's gate: the cluster's embedding, top-1 over the cluster experts, the universal
    expert (expert 0) weighted 1 - w."""

    def __init__(self, base: nn.Linear, c: MoCLEConfig, experts: int, routing):
        super().__init__(base, c, experts, routing)
        self.first = 1 if c.universal else 0            # the cluster-conditional experts are first..E-1
        dt, dev = base.weight.dtype, base.weight.device
        self.router = nn.Linear(c.task_dim, experts - self.first, bias=True, dtype=dt, device=dev)   # W_g, b_g

    def _probs(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """p (B, T, E): the gate over the cluster experts (the universal expert's column 0)."""
        B, T = x.shape[0], x.shape[1]
        ids = self.routing.cluster_ids
        ids = torch.zeros(B, dtype=torch.long) if ids is None or ids.shape[0] != B else ids
        logits = self.router(self.task_embedding(ids.to(x.device)))                # W_g C_k + b_g   (B, E - first)
        if self.training and self.c.gate_noise > 0:
            logits = logits + torch.randn_like(logits) * self.c.gate_noise
        p = torch.softmax(logits / self.c.temperature, -1)
        p = torch.cat([p.new_zeros(B, self.first), p], -1)
        return p[:, None, :].expand(B, T, self.E)

    def gates(self, x: torch.Tensor):
        mask = self._token_mask(x)
        p = self._probs(x, mask)
        w, i = p[..., self.first:].max(-1)                                         # top-1: w = p_i   (B, T)
        g = torch.zeros_like(p).scatter(-1, (i + self.first)[..., None], (w * w)[..., None])   # w · (w E_i(x))
        if self.first:
            g[..., 0] = 1 - w                                                      # (1 - w) G(x)
        return g, p, mask


class MoCLE(MixtureMethod):
    __doc__ = __doc__
    name = "mocle"
    title = "MoCLE: Mixture of cluster-conditional LoRA experts for vision-language instruction tuning"
    paper = "2312.12379"
    config_cls = MoCLEConfig
    mechanism_metrics = {
        **MixtureMethod.mechanism_metrics,
        "cluster_sizes": "training examples per k-means cluster (the fit set)",
        "cluster_purity": "Σ_k max_t n_(k,t) / N over the fit set: the share of examples whose cluster's majority task "
                          "is their own (1 = every cluster one task; a single-task trial is 1 by construction)",
        "cluster_share": "per cluster, the share of the examples routed to it since the last reading (training: "
                         "every training step)",
    }

    def __init__(self, config=None):
        super().__init__(config)
        self.routing.cluster_ids = None
        self.index: ClusterIndex | None = None
        self._counts = torch.zeros(self.config.clusters)

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        import re
        self.freeze_all_but_head(model, ctx)
        for name in resolve_targets(model, self.config.target_modules, ctx):
            layer = MoCLELinear(model.get_submodule(name), self.config, self.config.experts, self.routing)
            m = re.search(r"\.(\d+)\.", name)
            layer.depth = int(m.group(1)) if m else 0
            replace_module(model, name, layer)
        emb = model.get_input_embeddings()
        self.index = ClusterIndex(self.config.clusters, emb.weight.shape[1], emb.weight.dtype, emb.weight.device)
        model.mocle_clusters = self.index            # its buffers are saved and loaded with the adapter
        self._embedding = emb
        model.register_forward_pre_hook(self.routing.hook, with_kwargs=True)
        model.register_forward_pre_hook(self.route, with_kwargs=True)
        return model

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, H) the mean of the frozen input embeddings over each example's real tokens, L2-normalised."""
        e = self._embedding(input_ids).float()
        m = torch.ones(input_ids.shape, device=e.device) if mask is None else mask.to(e.device, torch.float32)
        mean = (e * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        return torch.nn.functional.normalize(mean, dim=-1)

    def route(self, module: nn.Module, args, kwargs):
        """Forward pre-hook: each example's cluster, from its embedding."""
        if any(kwargs.get(k) is not None for k in ("past_key_values", "cache")):
            raise ValueError("mocle routes an example by the embedding of the whole sequence; it cannot continue from "
                             "a key-value cache of a prefix: score full sequences")
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        if ids is None:
            raise ValueError("mocle clusters examples by their token ids: call the model with input_ids")
        cl = self.index.assign(self.embed(ids, kwargs.get("attention_mask")))
        self.routing.cluster_ids = cl
        self._counts += torch.bincount(cl.cpu(), minlength=self.config.clusters).float()
        return None

    def train_batches(self, state: TrainState, task, tokenizer, batch_size: int, seed: int):
        """The task's batches; the first ceil(fit_examples / batch_size) of them first fit the k-means."""
        stream = task.train_batches(tokenizer, batch_size, seed)
        head = [next(stream) for _ in range(math.ceil(self.config.fit_examples / batch_size))]
        state.metrics.update(self.fit_clusters(head, seed))
        yield from head
        yield from stream

    def fit_clusters(self, batches: list[dict], seed: int) -> dict:
        """k-means (scipy.cluster.vq.kmeans2, k-means++) over the batches' embeddings; the clusters' purity against
        the batches' task ids (all 0 without them)."""
        import numpy as np
        from scipy.cluster.vq import kmeans2
        emb = torch.cat([self.embed(b["input_ids"], b.get("attention_mask")) for b in batches])   # (N, H)
        tasks = torch.cat([b["task_ids"] if "task_ids" in b else torch.zeros(len(b["input_ids"]), dtype=torch.long)
                           for b in batches])
        centroids, labels = kmeans2(emb.numpy().astype(np.float64), self.config.clusters, minit="++",
                                    seed=np.random.default_rng(seed))
        with torch.no_grad():
            self.index.centroids.copy_(torch.from_numpy(centroids).to(self.index.centroids.dtype))
            self.index.fitted.fill_(True)
        labels = torch.from_numpy(labels).long()
        n = len(labels)
        majority = sum(int(torch.bincount(tasks[labels == k]).max()) for k in range(self.config.clusters)
                       if bool((labels == k).any()))
        return {"cluster_sizes": torch.bincount(labels, minlength=self.config.clusters).tolist(),
                "cluster_purity": round(majority / n, 4), "fit_examples_used": n}

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained tensors and the clusters' centroids."""
        return {**super().adapter_state_dict(model),
                **{f"mocle_clusters.{k}": v.detach() for k, v in self.index.named_buffers()}}

    def on_train_begin(self, state: TrainState) -> None:
        super().on_train_begin(state)
        self._counts.zero_()

    def router_metrics(self, model: nn.Module, reset: bool = True) -> dict:
        out = super().router_metrics(model, reset)
        total = float(self._counts.sum())
        if out and total:
            out["cluster_share"] = [round(float(c) / total, 4) for c in self._counts]
        if reset:
            self._counts.zero_()
        return out
