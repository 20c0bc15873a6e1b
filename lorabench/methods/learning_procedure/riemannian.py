"""Riemannian preconditioned LoRA (Zhang & Pilanci, arXiv 2402.02347).

LoRA whose gradients are preconditioned by the r x r Gram matrix of the other factor before the
optimizer sees them (the scaled gradient method of sec. 3, eq. (4) of the paper):

  ∇_A <- (B^T B + δ I)^{-1} ∇_A,     ∇_B <- ∇_B (A A^T + δ I)^{-1}

which is gradient descent under a Riemannian metric of the quotient manifold of rank-r matrices,
making the update of B A independent of how the product is split between the factors. Done in
the `on_after_backward` hook (the paper's scaled AdamW applies it to the gradient the same way).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.lora import LoRA, LoraConfig


@dataclass
class RiemannianConfig(LoraConfig):
    delta: float = option(1e-4, "damping δ of the r x r preconditioners (B^T B + δ I), keeps them invertible when "
                                "a factor is (near) zero, as at init", low=0.0)


def precondition_(A: torch.nn.Parameter, B: torch.nn.Parameter, delta: float) -> None:
    """eq. (4): scale ∇A by (B^T B + δI)^{-1} and ∇B by (A A^T + δI)^{-1}, in place, both from the current factors."""
    with torch.no_grad():
        eye = torch.eye(A.shape[0], dtype=torch.float32, device=A.device)
        gA = gB = None
        if A.grad is not None:
            gA = torch.linalg.solve(B.float().T @ B.float() + delta * eye, A.grad.float())  # (r, k)
        if B.grad is not None:
            gB = torch.linalg.solve(A.float() @ A.float().T + delta * eye, B.grad.float().T).T  # (d, r)
        if gA is not None:
            A.grad.copy_(gA)
        if gB is not None:
            B.grad.copy_(gB)


class RiemannianLoRA(LoRA):
    name = "riemannian"
    title = "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models"
    paper = "2402.02347"
    family = "learning-procedure"
    config_cls = RiemannianConfig
    default_lr = 5e-4

    def on_after_backward(self, state: TrainState) -> None:
        for layer in self.lora_layers(state.model):
            precondition_(layer.lora_A, layer.lora_B, self.config.delta)
