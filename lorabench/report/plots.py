"""PNG plots: the task metric against trainable parameters, peak memory and train tokens/s, with the
Pareto front marked; one figure per task and one averaged over tasks.

PNG bytes are reproducible: the Agg canvas with matplotlib's bundled font, no pyplot global state,
fixed size and dpi, and `metadata={"Software": None}` so no version string is written.
"""
from __future__ import annotations

import io
import math

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lorabench.report.tables import family_order

# (column, axis label, log scale, lower is better)
AXES = (
    ("trainable_params", "trainable parameters", True, True),
    ("peak_rss_mb", "peak memory (MB, process RSS)", False, True),
    ("train_tokens_per_s", "train tokens/s", False, False),
)
PNG_METADATA = {"Software": None}
DPI = 100


def pareto_front(xs, ys, x_lower_better: bool, y_higher_better: bool) -> list[bool]:
    """Which points no other point dominates (at least as good on both axes, better on one)."""
    pts = [((x if x_lower_better else -x), (-y if y_higher_better else y)) for x, y in zip(xs, ys)]  # minimise both
    out = []
    for i, (a, b) in enumerate(pts):
        if math.isnan(a) or math.isnan(b):
            out.append(False)
            continue
        dominated = any(j != i and c <= a and d <= b and (c < a or d < b)
                        for j, (c, d) in enumerate(pts) if not (math.isnan(c) or math.isnan(d)))
        out.append(not dominated)
    return out


def _colour(family: str):
    import matplotlib
    return matplotlib.colormaps["tab20"](family_order(family) % 20)


def figure_png(points: pd.DataFrame, title: str, metric: str, higher: bool) -> bytes:
    """points: one row per method label with family, score, score_ci95 and the AXES columns."""
    points = points.sort_values("label", kind="stable")
    fig = Figure(figsize=(15, 4.6), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(AXES))
    for ax, (col, name, log, lower) in zip(axes, AXES):
        p = points[points[col].notna() & points["score"].notna()]
        if log:
            p = p[p[col] > 0]
        front = pareto_front(list(p[col]), list(p["score"]), lower, higher)
        for (_, r), on in zip(p.iterrows(), front):
            ci = r["score_ci95"] if r["score_ci95"] == r["score_ci95"] else 0.0
            ax.errorbar([r[col]], [r["score"]], yerr=[[ci], [ci]], fmt="o", color=_colour(r["family"]),
                        markeredgecolor="black" if on else "none", markersize=7, capsize=2, linewidth=1)
            ax.annotate(r["label"], (r[col], r["score"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        fp = p[[bool(f) for f in front]].sort_values(col, kind="stable")
        if len(fp):
            ax.plot(fp[col], fp["score"], "--", color="black", linewidth=1, label="Pareto front")
            ax.legend(loc="best", fontsize=7)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(name + (" (lower is better)" if lower else " (higher is better)"))
        ax.set_ylabel(f"{metric} ({'higher' if higher else 'lower'} is better)")
        ax.grid(True, linewidth=0.3)
        if p.empty:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")
    fig.suptitle(title + " — error bars: 95% CI over seeds; black edge: on the Pareto front", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_METADATA)
    return buf.getvalue()


def task_plots(summary: pd.DataFrame) -> dict[str, bytes]:
    """{file name: PNG bytes}: one per task, plus `average.png` over the tasks where higher is better."""
    out = {}
    have = summary[summary["n_seeds"] > 0] if len(summary) else summary
    for task, g in have.groupby("task", sort=True):
        higher = bool(g["higher_is_better"].iloc[0])
        out[f"{task}.png"] = figure_png(g, f"{task}", str(g["metric"].iloc[0]), higher)
    up = have[have["higher_is_better"].astype(bool)] if len(have) else have
    tasks = sorted(set(up["task"])) if len(up) else []
    if len(tasks) > 1:
        cols = ["score"] + [c for c, *_ in AXES]
        on_all = up.groupby("label").filter(lambda g: set(g["task"]) == set(tasks))
        if len(on_all):
            avg = on_all.groupby("label", sort=True).agg(
                family=("family", "first"), **{c: (c, "mean") for c in cols}).reset_index()
            avg["score_ci95"] = float("nan")  # a mean over tasks, not over seeds: no seed interval
            out["average.png"] = figure_png(avg, f"mean over tasks {', '.join(tasks)} (methods run on all of them)",
                                            "mean task metric", True)
    return out
