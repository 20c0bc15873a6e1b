"""FlexLoRA: "Federated Fine-tuning of Large Language Models under Heterogeneous Language Tasks and
Client Resources" (Bai et al., arXiv 2402.11505).

Clients train LoRA at ranks their resources allow (`client_ranks`). The server does not average
the factors: it averages the full-size products, ΔW = Σ_i w_i s B_i A_i (the exact average, so the
aggregation error is zero), keeps that dense ΔW as the global update, and sends each client the
rank-r_i truncated SVD of it, B_i = U_r sqrt(S_r / s), A_i = sqrt(S_r / s) V_r^T (sec. 3 of
FlexLoRA: "aggregation of full-size LoRA weights" then "SVD-based redistribution"). What a
client loses to the truncation is recorded each round (`truncation_error`). In round 1 the global
update is zero and clients start from LoRA's seeded init truncated to their rank.
"""
from __future__ import annotations

import torch

from lorabench.methods.federated.base import State, layer_prefixes, normalised
from lorabench.methods.federated.hetero import HeteroRankLoRA, svd_factors, truncate


class FlexLoRA(HeteroRankLoRA):
    name = "flexlora"
    title = "Federated fine-tuning of large language models under heterogeneous language tasks and client resources"
    paper = "2402.11505"
    round_metrics = {"truncation_error": "mean over clients and layers of ||ΔW - s B_i A_i||_F / ||ΔW||_F, "
                                         "what the rank-r_i SVD sent to each client loses of the global update",
                     "client_ranks": "rank of each client sampled this round"}

    def download(self, global_state: State, slot: int, n_clients: int) -> State:
        r = self.rank_of(slot)
        deltas = {k[: -len(".delta")]: v for k, v in global_state.items() if k.endswith(".delta")}
        out = {k: v for k, v in global_state.items() if not k.endswith(".delta")}
        if not deltas:  # round 1: no aggregate yet, LoRA's seeded init at the client's rank
            return truncate(out, r)
        errs = []
        for p, d in deltas.items():
            out[f"{p}.lora_B"], out[f"{p}.lora_A"], err = svd_factors(d, r, self.delta_scale())
            errs.append(err)
        self.last_truncation_errors = getattr(self, "last_truncation_errors", []) + [sum(errs) / len(errs)]
        return out

    def aggregate(self, global_state, uploads, weights, slots, n_clients):
        w = normalised(weights)
        s = self.delta_scale()
        new = {k: v for k, v in global_state.items() if not (k.endswith(".lora_A") or k.endswith(".lora_B"))}
        for p in layer_prefixes(uploads[0]):
            # the exact average of the clients' full-size products (FlexLoRA's aggregation)
            new[f"{p}.delta"] = sum(wi * s * (u[f"{p}.lora_B"].float() @ u[f"{p}.lora_A"].float())
                                    for u, wi in zip(uploads, w))
        for k in uploads[0]:
            if not (k.endswith(".lora_A") or k.endswith(".lora_B")):
                new[k] = sum(wi * u[k].float() for u, wi in zip(uploads, w)).to(uploads[0][k].dtype)
        return new, w

    def global_delta_weights(self, global_state: State) -> dict[str, torch.Tensor]:
        deltas = {k[: -len(".delta")]: v for k, v in global_state.items() if k.endswith(".delta")}
        return deltas or self.delta_weights(global_state)

    @torch.no_grad()
    def load_global(self, model, global_state: State) -> None:
        deltas = {k[: -len(".delta")]: v for k, v in global_state.items() if k.endswith(".delta")}
        if not deltas:
            return self.load_state(model, global_state)
        self.load_state(model, {k: v for k, v in global_state.items() if not k.endswith(".delta")})
        for p, d in deltas.items():  # the global model is W0 + ΔW, dense: fold ΔW in, empty the factors
            layer = model.get_submodule(p)
            layer.base.weight += d.to(layer.base.weight.dtype)
            layer.lora_B.zero_()

    def round_summary(self, slots: list[int]) -> dict:
        errs = getattr(self, "last_truncation_errors", [])
        self.last_truncation_errors = []
        return {"truncation_error": round(sum(errs) / len(errs), 6) if errs else 0.0,
                "client_ranks": [self.rank_of(s) for s in slots]}
