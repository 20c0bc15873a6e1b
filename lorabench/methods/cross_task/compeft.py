"""ComPEFT (Yadav, Choshen, Raffel, Bansal, "ComPEFT: Compression for Communicating Parameter Efficient Updates via
Sparsification and Quantization", arXiv 2311.13171): each task's PEFT update is compressed to a sparse ternary
vector with one scale before it is communicated or merged.

For a LoRA module the update (the task vector) is its parameters' change from their initialisation,
τ = (A − A_0, B − B_0) with B_0 = 0, per parameter tensor. ComPEFT (sec. 3):

    1. sparsify: keep the k fraction of entries of τ of largest magnitude, zero the rest          (top-k)
    2. quantise: replace each kept entry by its sign, and scale all by one number, α σ(τ),
       τ̃ = α σ(τ) · sign(τ) ⊙ m_k,   σ(τ) the standard deviation of the original τ               (ternary)

and the compressed module is (A_0 + τ̃_A, τ̃_B). The scale α is tuned on validation data in the paper; here the
held-out task's k shots are all there is, so α is the one of `alpha_grid` whose composition has the lowest k-shot
loss (as lora-arithmetic's λ). The compressed candidates are then composed like `uniform-average`, by the exact mean
of their updates (1/N) Σ s B̃_i Ã_i (the paper composes compressed LoRA modules for unseen tasks with LoraHub; the
mean is the composition rule without a search of its own, so what the compression costs shows alone). A_0 is each
library adapter's initial A, rebuilt from the adapter's id (lorabench/harness/multitask.py, `initial_factors`).

Stored size: a ternary tensor of density k needs the positions of its non-zeros and a sign each; at the entropy of
the mask, H(k) + k bits per entry (H the binary entropy) against 32 for float32, plus one scale per tensor;
`compression_ratio` is 32 / (H(k) + k) (Golomb-coded positions, as the paper stores them, come close to H(k)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorabench.config import option
from lorabench.methods.cross_task.base import Composition, CompositionMethod, LossFn, State, check_library
from lorabench.methods.cross_task.uniform_average import concatenated
from lorabench.methods.lora.config import LoraConfig


@dataclass
class ComPEFTConfig(LoraConfig):
    density: float = option(0.1, "k: the fraction of each update tensor's entries kept (largest magnitude)",
                            low=0.0, high=1.0)
    alpha_grid: list[float] = option(help="scales α tried (the kept signs times α σ(τ)); the one whose composition "
                                          "has the lowest k-shot loss is kept",
                                     default_factory=lambda: [0.5, 1.0, 2.0, 4.0])

    def __post_init__(self):
        super().__post_init__()
        if not self.alpha_grid:
            raise ValueError("alpha_grid is empty; give at least one scale, e.g. [1.0]")
        if self.density <= 0:
            raise ValueError("density must be above 0 (density 0 keeps nothing); ComPEFT keeps e.g. 0.05-0.5")


def compress(tau: torch.Tensor, density: float, alpha: float) -> torch.Tensor:
    """τ̃ = α σ(τ) sign(τ) ⊙ m_k: the k·numel entries of largest |τ| keep their sign, all scaled by α σ(τ)."""
    flat = tau.float().flatten()
    keep = max(1, int(round(density * flat.numel())))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.abs().topk(keep).indices] = True                       # top-k by magnitude (sparsify)
    sigma = flat.std(unbiased=False)                                 # σ(τ) of the original update
    return (alpha * sigma * torch.sign(flat) * mask).reshape(tau.shape)   # ternary: {−ασ, 0, +ασ}


def compression_ratio(density: float) -> float:
    """32 bits per float32 entry against H(k) + k bits (the mask at its entropy, one sign per kept entry)."""
    if density >= 1:
        return 32.0
    h = -(density * math.log2(density) + (1 - density) * math.log2(1 - density))
    return 32.0 / (h + density)


def compressed_state(state: State, initial: State, density: float, alpha: float) -> State:
    """The compressed LoRA module (A_0 + τ̃_A, τ̃_B) of one library adapter."""
    out = {}
    for p in check_library([state]):
        A0 = initial[f"{p}.lora_A"].float()
        out[f"{p}.lora_A"] = A0 + compress(state[f"{p}.lora_A"].float() - A0, density, alpha)
        out[f"{p}.lora_B"] = compress(state[f"{p}.lora_B"].float(), density, alpha)      # B_0 = 0
    return out


class ComPEFT(CompositionMethod):
    __doc__ = __doc__
    name = "compeft"
    title = "ComPEFT: Compression for Communicating Parameter Efficient Updates via Sparsification and Quantization"
    paper = "2311.13171"
    config_cls = ComPEFTConfig
    needs_initial_factors = True   # the harness sets `initial_states`: each candidate's A_0

    initial_states: list[State] | None = None

    def compose(self, states: list[State], scale: float, loss_fn: LossFn, seed: int) -> Composition:
        c = self.config
        if self.initial_states is None or len(self.initial_states) != len(states):
            raise ValueError("compeft needs each library adapter's initial factors (initial_states, one per "
                             "adapter): the update it compresses is the change from them")
        w = [1.0 / len(states)] * len(states)
        tried = []
        for a in c.alpha_grid:
            packed = [compressed_state(s, s0, c.density, a) for s, s0 in zip(states, self.initial_states)]
            state = concatenated(packed, w, scale)                      # the exact mean of the compressed updates
            tried.append((float(loss_fn(state)), a, state))
        loss, alpha, state = min(tried, key=lambda t: t[0])
        return Composition(state, w, len(tried),
                           {"alpha": alpha, "density": c.density, "kshot_loss": round(loss, 6),
                            "compression_ratio": round(compression_ratio(c.density), 3)})
