"""Validation curves: the learning curves budgets are chosen from.

A trial trained with `train.val_every` records its validation score every that many steps. Per
curve the report gives the plateau (the mean of the last three points) and the first step at which
the curve reaches 95% of its gain over the task's best trivial baseline:

    reach95 = min { step : val(step) >= baseline + 0.95 * (plateau - baseline) }

(with no trivial baseline recorded, 95% of the plateau itself). A budget at or past reach95 for
LoRA is "past the noise" in the sense of docs/leaderboard.md: more steps would buy at most 5% of
what training buys.
"""
from __future__ import annotations

import io
import math

import pandas as pd

PLATEAU_POINTS = 3
FRACTION = 0.95


def reach(curve: list[tuple[int, float]], baseline: float | None, higher: bool = True) -> tuple[float, int | None]:
    """(plateau, first step reaching FRACTION of the gain over baseline); step None if never."""
    if not curve:
        return float("nan"), None
    tail = [v for _, v in curve[-PLATEAU_POINTS:]]
    plateau = sum(tail) / len(tail)
    target = (baseline + FRACTION * (plateau - baseline)) if baseline is not None and not math.isnan(baseline) \
        else FRACTION * plateau
    for step, v in curve:
        if (v >= target) if higher else (v <= target):
            return plateau, int(step)
    return plateau, None


def curves_frame(trials: pd.DataFrame, baselines: pd.DataFrame) -> pd.DataFrame:
    """One row per trial with a validation curve: its plateau, reach95 and the curve's last step."""
    cols = ["task", "label", "lr", "seed", "points", "last_step", "plateau", "reach95", "baseline"]
    ok = trials[(trials["status"] == "ok") & (trials["val_curve"].map(len) > 0)] if len(trials) else trials
    base = {r["task"]: r["best_score"] for _, r in baselines.iterrows() if r.get("best")} if len(baselines) else {}
    rows = []
    for _, r in ok.iterrows():
        b = base.get(r["task"])
        higher = bool(r["higher_is_better"]) if r["higher_is_better"] is not None else True
        plateau, step = reach(r["val_curve"], b, higher)
        rows.append({"task": r["task"], "label": r["label"], "lr": r["lr"], "seed": int(r["seed"]),
                     "points": len(r["val_curve"]), "last_step": int(r["val_curve"][-1][0]), "plateau": plateau,
                     "reach95": float("nan") if step is None else float(step),
                     "baseline": float("nan") if b is None else float(b)})
    return pd.DataFrame(rows, columns=cols).sort_values(["task", "label", "lr", "seed"], kind="stable") \
        .reset_index(drop=True)


def curve_plots(trials: pd.DataFrame, baselines: pd.DataFrame) -> dict:
    """plots/curves-TASK.png: validation score against steps, one line per (method, learning rate, seed),
    the best trivial baseline dashed; deterministic bytes (Agg, no metadata)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from lorabench.report.plots import Plot

    out: dict[str, Plot] = {}
    if not len(trials):
        return out
    ok = trials[(trials["status"] == "ok") & (trials["val_curve"].map(len) > 0)]
    base = {r["task"]: (r["best"], r["best_score"]) for _, r in baselines.iterrows() if r.get("best")} \
        if len(baselines) else {}
    for task, g in ok.groupby("task", sort=True):
        fig = Figure(figsize=(7, 4.2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for (label, lr, seed), h in g.groupby(["label", "lr", "seed"], sort=True):
            curve = h["val_curve"].iloc[0]
            ax.plot([p[0] for p in curve], [p[1] for p in curve], marker="o", markersize=3,
                    label=f"{label} lr {lr:.3g} seed {seed}")
        if task in base:
            name, score = base[task]
            ax.axhline(score, color="grey", linestyle="--", linewidth=1, label=f"{name} (trivial baseline)")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"validation {g['metric'].iloc[0]}")
        ax.set_title(f"{task}: validation curves")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
        out[f"curves-{task}.png"] = Plot(buf.getvalue(), f"{task}: validation curves")
    return out
