"""L-LoRA (Tang, Shen, Luo, Zhan, Hu, Du, Chen, Tao, "Parameter Efficient Multi-task Model Fusion with Partial
Linearization", arXiv 2310.04742): LoRA modules fine-tuned in their tangent space, then merged by task arithmetic.

Partial linearisation (sec. 4 of the paper): only the PEFT modules are linearised, each around its own initial
parameters φ0 = (A0, B0), by the first-order Taylor expansion of the module's output in its parameters,

    g_lin(x; φ) = g(x; φ0) + ∇_φ g(x; φ0) (φ − φ0)          g(x; A, B) = s B A x   (LoRA's eq. (3))

computed here, as in the paper's released code (a wrapper around each LoRA layer), by one forward-mode product
`torch.func.jvp(g, φ0, φ − φ0)`; the frozen base W0 x is added outside (its parameters do not move, so their
tangent is zero). The rest of the network stays non-linear: the model is linear in each layer's adapter, not in
all of them jointly. Written out, g_lin = s (B0 A0 + (B − B0) A0 + B0 (A − A0)) x, so with LoRA's initialisation
B0 = 0 (the paper fine-tunes from PEFT's, B = 0) it is s B A0 x: the Jacobian in A vanishes at B0 = 0, A receives no
gradient and stays at its initial value, and only B is fine-tuned (the mechanism metrics record it). Every task
fine-tuned from the same initialisation φ0 (one seed for the whole library, as the paper's) then has the task
vector τ_i = φ_i − φ0 = (0, B_i), and the task-arithmetic merge the paper fuses with (Ilharco et al., arXiv
2212.04089), θ = θ0 + λ Σ_i τ_i, gives the linearised modules s (λ Σ_i B_i) A0 x: the
sum of the tasks' updates ΔW_i = s B_i A0 exactly, one adapter of rank r, with no cross terms (contrast LoRAHub's
factor-wise sum, `base.factorwise`). The paper chooses λ on validation data; in the leave-one-task-out protocol
(lorabench/harness/cross_task.py) the held-out task's k shots are all there is, so λ is the one of `lambda_grid`
with the lowest k-shot loss (as lora-arithmetic's).

A single-task trial of `l-lora` fine-tunes one linearised LoRA (the kind its library holds). The library
(`build_linearized_library` in lorabench/harness/multitask.py) is its own: one linearised adapter per task, each
trained alone through the single-task loop (the fused SGMV path has no forward-mode rule), cached by its own id,
stored as the plain `lora` adapter (A0, B) that computes the linearised module exactly.

Weight disentanglement, the paper's argument for linearisation, is measured cheaply (`task_vector_cosines`): the
cosine similarity between the tasks' weight updates ΔW_i (all layers flattened together), for the linearised
library and for the plain library of the same tasks (the paper's figure of task-vector cosine similarities; the
updates, not the parameters, are compared because the plain library's adapters start from different A0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.cross_task.base import Composition, CompositionMethod, LossFn, State, check_library
from lorabench.methods.lora.config import LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant


@dataclass
class LLoraConfig(LoraConfig):
    lambda_grid: list[float] = option(
        help="task arithmetic's scaling λ of the summed task vectors (θ0 + λ Σ τ_i); the one with the lowest k-shot "
             "loss is kept (the paper searches λ on validation data)",
        default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    compare_plain: bool = option(
        True, "cross-task trials: also read the plain library's adapters of the same tasks (trained, fused, if not "
              "cached) and record the cosine similarities of the tasks' updates, linearised against plain")

    def __post_init__(self):
        super().__post_init__()
        if not self.lambda_grid:
            raise ValueError("lambda_grid is empty; give at least one scale, e.g. [1.0]")
        if self.kernel != "reference":
            raise ValueError(f"kernel={self.kernel!r}: l-lora computes its linearised modules with torch.func.jvp, "
                             f"which the fused lora_linear op has no forward-mode rule for; use kernel 'reference'")


class LinearizedVariant(LoraVariant):
    """The LoRA module linearised around its initial factors (A0, B0), kept as buffers (saved with the adapter)."""

    def init(self, layer: LoraLinear) -> None:
        layer.register_buffer("lora_A0", layer.lora_A.detach().clone())   # φ0: the expansion point
        layer.register_buffer("lora_B0", layer.lora_B.detach().clone())

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        from torch.func import jvp
        h = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x

        def module(A, B):   # g(x; A, B) = s B A x, LoRA's term as a function of its own parameters
            return F.linear(F.linear(h, A), B) * layer.scale
        # g(x; φ0) + ∇_φ g(x; φ0) (φ − φ0): the first-order Taylor expansion (sec. 4), one forward-mode product
        g0, tangent = jvp(module, (layer.lora_A0, layer.lora_B0),
                          (layer.lora_A - layer.lora_A0, layer.lora_B - layer.lora_B0))
        return layer.base(x) + g0 + tangent

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        A0, B0 = layer.lora_A0, layer.lora_B0
        # the linearised module's update: s (B0 A0 + (B − B0) A0 + B0 (A − A0))
        return layer.scale * (B0 @ A0 + (layer.lora_B - B0) @ A0 + B0 @ (layer.lora_A - A0))


def library_state(state: State) -> State:
    """A trained linearised adapter ({layer}.lora_A/B/A0/B0) as the plain LoRA (A0, B) that computes its linearised
    module exactly: s B A0 x when B0 = 0 (LoRA's initialisation; a clear error otherwise)."""
    out = {}
    for p in sorted(k[: -len(".lora_A0")] for k in state if k.endswith(".lora_A0")):
        if bool(state[f"{p}.lora_B0"].any()):
            raise ValueError(f"{p}: the linearised library needs B0 = 0 (zero_init 'B', LoRA's initialisation)")
        out[f"{p}.lora_A"] = state[f"{p}.lora_A0"].detach().clone()
        out[f"{p}.lora_B"] = state[f"{p}.lora_B"].detach().clone()
    return out


def task_arithmetic(states: list[State], lam: float, scale: float) -> State:
    """θ0 + λ Σ_i τ_i for library adapters stored as (A0, B_i) that share A0, their task vectors τ_i = (0, B_i):
    the linearised modules at that point compute s (λ Σ_i B_i) A0 x; returned as (A0, s λ Σ_i B_i), s folded."""
    out = {}
    for p in check_library(states):
        A0 = states[0][f"{p}.lora_A"].float()
        for i, s in enumerate(states[1:], 1):
            if not torch.equal(s[f"{p}.lora_A"].float(), A0):
                raise ValueError(f"library adapter {i} has another initial A than adapter 0 at {p}: task arithmetic "
                                 f"over linearised adapters needs one initialisation φ0 for every task")
        out[f"{p}.lora_A"] = A0
        out[f"{p}.lora_B"] = scale * lam * sum(s[f"{p}.lora_B"].float() for s in states)   # (out, r)
    return out


def update_gram(states: list[State], scale: float) -> torch.Tensor:
    """G_ij = Σ_layers <ΔW_i, ΔW_j>_F with ΔW = s B A, as Σ_layers tr((B_i^T B_j)(A_j A_i^T)): r x r products,
    without forming any (out, in) matrix."""
    n = len(states)
    G = torch.zeros(n, n, dtype=torch.float64)
    for p in check_library(states):
        A = [s[f"{p}.lora_A"].double() for s in states]
        B = [s[f"{p}.lora_B"].double() for s in states]
        for i in range(n):
            for j in range(i, n):
                G[i, j] += scale * scale * torch.trace((B[i].T @ B[j]) @ (A[j] @ A[i].T))
                G[j, i] = G[i, j]
    return G


def task_vector_cosines(states: list[State], scale: float) -> dict:
    """Pairwise cosine similarity of the adapters' updates ΔW_i (all layers flattened together): the mean of |cos|
    over pairs (0: orthogonal task vectors, the disentanglement the paper argues for) and each pair's cos."""
    G = update_gram(states, scale)
    d = G.diagonal().clamp(min=1e-300).sqrt()
    C = G / d[:, None] / d[None, :]
    pairs = [(i, j) for i in range(len(states)) for j in range(i + 1, len(states))]
    return {"mean_abs_cos": round(sum(abs(float(C[i, j])) for i, j in pairs) / len(pairs), 6) if pairs else None,
            "cos": [[round(float(C[i, j]), 6) for j in range(len(states))] for i in range(len(states))],
            "update_norms": [round(float(x), 6) for x in d]}


class LLoRA(CompositionMethod):
    __doc__ = __doc__
    name = "l-lora"
    title = "L-LoRA: Parameter efficient multi-task model fusion with partial linearization"
    paper = "2310.04742"
    config_cls = LLoraConfig
    linearized_library = True   # the cross-task harness builds its library with build_linearized_library
    mechanism_metrics = {
        "a_grad_max": "the largest gradient norm that reached any A over training: 0, as the linearised module's "
                      "Jacobian in A is B0 = 0",
        "b_update_norm": "||B - B0||_F over all layers at the end: the tangent-space fine-tuning moved B",
        "linearization_gap": "max over layers of ||ΔW_lora(A, B) - ΔW_lin||_F / ||ΔW_lin||_F at the end: what the "
                             "non-linear LoRA module at the trained factors adds to the linearised one (0 while A = A0)",
    }

    def variant(self) -> LoraVariant:
        return LinearizedVariant()

    def adapter_state_dict(self, model) -> dict[str, torch.Tensor]:
        out = super().adapter_state_dict(model)   # A, B; the expansion point too: the adapter is not itself without it
        for lname, layer in model.named_modules():
            if isinstance(layer, LoraLinear):
                out[f"{lname}.lora_A0"], out[f"{lname}.lora_B0"] = layer.lora_A0.detach(), layer.lora_B0.detach()
        return out

    def on_train_begin(self, state: TrainState) -> None:
        self._a_grad_max = 0.0

    def on_after_backward(self, state: TrainState) -> None:
        for m in self.lora_layers(state.model):
            if m.lora_A.grad is not None:
                self._a_grad_max = max(self._a_grad_max, float(m.lora_A.grad.norm()))

    @torch.no_grad()
    def on_train_end(self, state: TrainState) -> None:
        layers = self.lora_layers(state.model)
        gaps = []
        for m in layers:
            lin = m.variant.delta_weight(m)
            gaps.append(float((m.scale * m.lora_B @ m.lora_A - lin).norm() / lin.norm().clamp(min=1e-30)))
        state.metrics["a_grad_max"] = round(getattr(self, "_a_grad_max", 0.0), 8)
        state.metrics["b_update_norm"] = round(math.sqrt(sum(float((m.lora_B - m.lora_B0).pow(2).sum())
                                                             for m in layers)), 6)
        state.metrics["linearization_gap"] = round(max(gaps), 8) if gaps else 0.0

    def compose(self, states: list[State], scale: float, loss_fn: LossFn, seed: int) -> Composition:
        tried = []
        for lam in self.config.lambda_grid:
            state = task_arithmetic(states, lam, scale)
            tried.append((float(loss_fn(state)), lam, state))
        loss, lam, state = min(tried, key=lambda t: t[0])
        return Composition(state, [lam] * len(states), len(tried),
                           {"lambda": lam, "kshot_loss": round(loss, 6),
                            "kshot_loss_by_lambda": {str(l): round(x, 6) for x, l, _ in tried}})
