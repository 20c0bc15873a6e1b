"""SVD initialisations of LoRA: PiSSA (arXiv 2404.02948) and MiLoRA (arXiv 2406.09044).

Both split the pretrained weight W = U S V^T (truncated SVD) into an adapter built from r singular
components and a frozen residual, so that the adapted model equals the pretrained one at step 0:

  A = sqrt(S_r / s) V_r^T,  B = U_r sqrt(S_r / s),  W_res = W - s B A   (eqs. (2)-(4) of PiSSA)

PiSSA takes the r *principal* components (largest singular values): it trains the directions that
matter most and leaves the noisy tail frozen. MiLoRA takes the r *minor* components (smallest
singular values; sec. 3 of MiLoRA) so that fine-tuning moves in directions that least disturb the
pretrained knowledge. The division by the LoRA scale s keeps s B A = U_r S_r V_r^T for any alpha,
as PEFT's `init_lora_weights="pissa"` does, with which ours agrees exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lorabench.config import option
from lorabench.methods.lora import LoRA, LoraConfig, LoraLinear, LoraVariant


@dataclass
class PissaConfig(LoraConfig):
    alpha: float = option(8.0, "scaling numerator alpha (scale alpha / r); PiSSA's paper uses alpha = r "
                               "(scale 1): the adapter then holds exactly the singular components", low=0.0)
    svd: Literal["full", "lowrank"] = option(
        "full", "'full': torch.linalg.svd (exact; PEFT's 'pissa'); 'lowrank': randomised torch.svd_lowrank "
                "(fast SVD, PEFT's 'pissa_niter_[n]'; PiSSA only)")
    svd_niter: int = option(4, "subspace iterations of the 'lowrank' SVD", low=0, high=64)


class SvdInitVariant(LoraVariant):
    """Initialise A, B from r singular components of W and subtract them from the base weight."""

    def __init__(self, minor: bool, svd: str = "full", niter: int = 4):
        self.minor, self.svd, self.niter = minor, svd, niter

    @torch.no_grad()
    def init(self, layer: LoraLinear) -> None:
        w = layer.base.weight
        r = layer.rank
        if r > min(w.shape):
            raise ValueError(f"rank {r} exceeds min(out, in) = {min(w.shape)} of a {tuple(w.shape)} layer")
        w32 = w.float()
        if self.svd == "lowrank":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # fixed: loading the adapter must rebuild the same residual W_res
                U, S, V = torch.svd_lowrank(w32, r, niter=self.niter)  # PiSSA sec. 4.5 "fast SVD"
            Ur, Sr, Vhr = U, S, V.T
        else:
            U, S, Vh = torch.linalg.svd(w32, full_matrices=False)  # W = U S V^T, S descending
            sl = slice(-r, None) if self.minor else slice(0, r)  # MiLoRA: minor, PiSSA: principal components
            Ur, Sr, Vhr = U[:, sl], S[sl], Vh[sl]
        Sr = Sr / layer.scale  # so that s B A = U_r S_r V_r^T
        layer.lora_A.copy_((torch.diag(torch.sqrt(Sr)) @ Vhr).to(w.dtype))  # eq. (2): A = S_r^1/2 V_r^T
        layer.lora_B.copy_((Ur @ torch.diag(torch.sqrt(Sr))).to(w.dtype))  # eq. (3): B = U_r S_r^1/2
        w.copy_((w32 - layer.scale * layer.lora_B.float() @ layer.lora_A.float()).to(w.dtype))  # eq. (4): W_res


class PiSSA(LoRA):
    name = "pissa"
    title = "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models"
    paper = "2404.02948"
    family = "learning-procedure"
    config_cls = PissaConfig
    default_lr = 2e-4  # the principal components are large: PiSSA's paper trains with 2e-5..2e-4

    def variant(self) -> LoraVariant:
        return SvdInitVariant(minor=False, svd=self.config.svd, niter=self.config.svd_niter)
