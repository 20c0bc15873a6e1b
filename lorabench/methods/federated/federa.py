"""FeDeRA: "Efficient Fine-tuning of Language Models in Federated Learning Leveraging Weight Decomposition"
(Yan et al., arXiv 2404.18848).

Every client initialises its adapter from the singular value decomposition of the pretrained
weight instead of LoRA's random A and zero B: with W = U S V^T, A = sqrt(S_r / s) V_r^T and
B = U_r sqrt(S_r / s) (the r principal components), and the frozen weight becomes the residual
W - s B A so that the model is unchanged at step 0 (sec. 3 of FeDeRA). The SVD is deterministic,
so every client starts from the same factors without any being sent; the paper finds that this
start reduces the oscillation of the updates under non-IID data. The server aggregates the
factors by FedAvg, as FedIT (inexact; the record shows by how much).
"""
from __future__ import annotations

import torch

from lorabench.methods.federated.base import FederatedLoRA
from lorabench.methods.lora import LoraLinear, LoraVariant


class PrincipalSvdInit(LoraVariant):
    """A, B from the r principal singular components of W; W becomes the residual (sec. 3 of FeDeRA)."""

    @torch.no_grad()
    def init(self, layer: LoraLinear) -> None:
        w = layer.base.weight
        r = layer.rank
        if r > min(w.shape):
            raise ValueError(f"rank {r} exceeds min(out, in) = {min(w.shape)} of a {tuple(w.shape)} layer")
        U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)  # W = U S V^T, S descending
        root = torch.sqrt(S[:r] / layer.scale)  # s B A = U_r S_r V_r^T for any alpha
        layer.lora_A.copy_((root[:, None] * Vh[:r]).to(w.dtype))
        layer.lora_B.copy_((U[:, :r] * root[None]).to(w.dtype))
        w.copy_((w.float() - layer.scale * layer.lora_B.float() @ layer.lora_A.float()).to(w.dtype))  # residual


class FeDeRA(FederatedLoRA):
    name = "federa"
    title = "FeDeRA: Efficient fine-tuning of language models in federated learning leveraging weight decomposition"
    paper = "2404.18848"
    default_lr = 2e-4  # the principal components are large, as PiSSA's: a smaller rate than LoRA's

    def variant(self) -> LoraVariant:
        return PrincipalSvdInit()
