"""Adapter arithmetic (Zhang et al., "Composing Parameter-Efficient Modules with Arithmetic Operations",
arXiv 2306.14870): manually designed weights, composed with the paper's two operators on LoRA modules.

- addition: θ = Σ_i λ_i θ_i, applied to A and B separately (the paper's addition operator on LoRA);
- negation: a LoRA module's negation is (A, -B), so that ΔW = -B A (the paper's negation operator for
  LoRA: negating both factors would leave B A unchanged).

The weights are the design: `weights` (default: all equal, 1/N), adapters listed in `negate` negated, and
one overall scale λ (the paper tunes its λ on validation data; here the held-out task's k shots are all
there is, so λ is the one of `lambda_grid` with the lowest k-shot loss).
"""
from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import option
from lorabench.methods.cross_task.base import Composition, CompositionMethod, LossFn, State, factorwise
from lorabench.methods.lora.config import LoraConfig


@dataclass
class ArithmeticConfig(LoraConfig):
    weights: list[float] | None = option(None, "the weight of each library adapter, in library order (None: 1/N each)")
    negate: list[int] = option(help="indices of library adapters to negate ((A, -B): their update subtracted)",
                               default_factory=list)
    lambda_grid: list[float] = option(help="overall scales λ tried; the one with the lowest k-shot loss is kept",
                                      default_factory=lambda: [0.5, 1.0, 2.0])

    def __post_init__(self):
        super().__post_init__()
        if not self.lambda_grid:
            raise ValueError("lambda_grid is empty; give at least one scale, e.g. [1.0]")


def negated(state: State) -> State:
    """The negation operator for a LoRA module: (A, -B)."""
    return {k: -v if k.endswith(".lora_B") else v for k, v in state.items()}


class LoraArithmetic(CompositionMethod):
    __doc__ = __doc__
    name = "lora-arithmetic"
    title = "Composing Parameter-Efficient Modules with Arithmetic Operations"
    paper = "2306.14870"
    config_cls = ArithmeticConfig

    def design(self, n: int) -> list[float]:
        c = self.config
        if c.weights is not None and len(c.weights) != n:
            raise ValueError(f"weights has {len(c.weights)} entries for a library of {n} adapters; give one per "
                             f"adapter or leave it None (1/N each)")
        bad = [i for i in c.negate if not 0 <= i < n]
        if bad:
            raise ValueError(f"negate lists {bad}, outside the library's adapters 0..{n - 1}")
        return list(c.weights) if c.weights is not None else [1.0 / n] * n

    def compose(self, states: list[State], scale: float, loss_fn: LossFn, seed: int) -> Composition:
        base = self.design(len(states))
        signed = [negated(s) if i in self.config.negate else s for i, s in enumerate(states)]  # negation operator
        tried = []
        for lam in self.config.lambda_grid:
            w = [lam * b for b in base]
            state = factorwise(signed, w, scale)   # addition operator: Σ λ_i θ_i on A and on B
            tried.append((float(loss_fn(state)), lam, w, state))
        loss, lam, w, state = min(tried, key=lambda t: t[0])
        signs = [-1.0 if i in self.config.negate else 1.0 for i in range(len(states))]
        return Composition(state, [s * x for s, x in zip(signs, w)], len(tried),
                           {"lambda": lam, "kshot_loss": round(loss, 6), "negated": list(self.config.negate)})
