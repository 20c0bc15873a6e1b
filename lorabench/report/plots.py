"""PNG plots: the task metric against trainable parameters, peak memory and train tokens/s, with the
Pareto front marked; one figure per task and one averaged over tasks. Dozens of methods crowd
together (about 30 near 1.2M trainable parameters), so only the Pareto front and the reference
methods are labelled, where their labels overlap nothing; colours are the survey's families, in a
legend; every point keeps its name in the HTML page, on hover (`Plot.hotspots`).

PNG bytes are reproducible: the Agg canvas with matplotlib's bundled font, no pyplot global state,
fixed size and dpi, and `metadata={"Software": None}` so no version string is written.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from lorabench.report.tables import REFERENCE, family_order

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


# Labelled on every plot beside the Pareto front: the reference every method is compared with and
# the two baselines that bound it (a frozen backbone with a trained head, full fine-tuning). The
# other points are named by hovering over them in the HTML page (Plot.hotspots).
REFERENCE_LABELS = (REFERENCE, "head", "full")
# Label positions tried around a point, nearest first: offsets in points, the first that overlaps
# no placed label, no marker and stays inside the axes wins; beyond the nearest ring a leader line
# joins label and point.
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
_RADII = (5, 14, 24, 36, 50, 66, 84, 105)
_MARKER_PX = 9  # a marker's box, as an obstacle to labels


@dataclass
class Hotspot:
    """A plotted point, in pixels of the PNG (origin top left), for the HTML page's hover text."""
    label: str
    x_px: float
    y_px: float
    text: str


@dataclass
class Label:
    """A label drawn in the image: its text, panel, box in pixels (x0, y0, x1, y1; origin bottom
    left) and whether it found a free place (False: drawn next to its point over something else)."""
    text: str
    panel: int
    box: tuple[float, float, float, float]
    free: bool


@dataclass
class Plot:
    png: bytes
    title: str
    hotspots: list[Hotspot] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _place_labels(ax, renderer, points: list[tuple[float, float, str]], obstacles: list) -> list[tuple[str, object, bool]]:
    """Annotate each (x, y, text) where its label overlaps nothing already drawn (see _RADII);
    returns (text, box, found a free place) per label."""
    inside = ax.get_window_extent(renderer)
    out = []
    for x, y, text in points:
        placed = None
        for radius in _RADII:
            for dx, dy in _DIRECTIONS:
                ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx * radius, dy * radius),
                                  fontsize=7, ha="left" if dx > 0 else "right" if dx < 0 else "center",
                                  va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                                  arrowprops=None if radius == _RADII[0] else
                                  dict(arrowstyle="-", color="0.45", linewidth=0.6, shrinkA=0, shrinkB=3))
                ann.update_positions(renderer)
                box = Text.get_window_extent(ann, renderer).padded(2)  # the text alone, not its leader line
                if (box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0 and box.y1 <= inside.y1
                        and not any(_overlaps(box, o) for o in obstacles)):
                    placed = box
                    break
                ann.remove()
            if placed is not None:
                break
        free = placed is not None
        if not free:  # no free place near it: next to the point, over whatever is there
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ann.update_positions(renderer)
            placed = Text.get_window_extent(ann, renderer)
        obstacles.append(placed)
        out.append((text, placed, free))
    return out


def figure_png(points: pd.DataFrame, title: str, metric: str, higher: bool, interval: str | None,
               why_no_interval: str = "one seed per method") -> Plot:
    """points: one row per method label with family, score, score_ci95 and the AXES columns.
    interval: what the error bars show; None: there are none, for the reason `why_no_interval`."""
    points = points.sort_values("label", kind="stable")
    fig = Figure(figsize=(15, 5.6), dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    # A fixed layout (not tight_layout): labels are placed in pixels, after the axes are final.
    axes = fig.subplots(1, len(AXES), gridspec_kw=dict(left=0.05, right=0.99, top=0.9, bottom=0.27, wspace=0.22))
    panels = []
    for ax, (col, name, log, lower) in zip(axes, AXES):
        p = points[points[col].notna() & points["score"].notna()]
        if log:
            p = p[p[col] > 0]
        front = pareto_front(list(p[col]), list(p["score"]), lower, higher)
        for (_, r), on in zip(p.iterrows(), front):
            ci = r["score_ci95"] if r["score_ci95"] == r["score_ci95"] else 0.0
            ax.errorbar([r[col]], [r["score"]], yerr=[[ci], [ci]] if interval else None, fmt="o",
                        color=_colour(r["family"]), markeredgecolor="black" if on else "none", markersize=7,
                        capsize=2, linewidth=1)
        # a boolean Series, not a list: an empty list would select no *columns* (no throughput recorded)
        fp = p[pd.Series([bool(f) for f in front], index=p.index, dtype=bool)].sort_values(col, kind="stable")
        if len(fp):
            ax.plot(fp[col], fp["score"], "--", color="black", linewidth=1)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(name + (" (lower is better)" if lower else " (higher is better)"))
        ax.set_ylabel(f"{metric} ({'higher' if higher else 'lower'} is better)")
        ax.grid(True, linewidth=0.3)
        if p.empty:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")
        panels.append((ax, col, p, front))
    families = sorted(set(points["family"]), key=family_order)
    handles = [Line2D([], [], marker="o", linestyle="", color=_colour(f), markersize=7, label=f) for f in families]
    handles.append(Line2D([], [], marker="o", linestyle="--", color="black", markerfacecolor="white",
                          markeredgecolor="black", markersize=7, label="Pareto front (black edge)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False,
               title="survey family (colour); labelled: the Pareto front and " + ", ".join(REFERENCE_LABELS),
               title_fontsize=8)
    bars = f"error bars: {interval}" if interval else f"no error bars ({why_no_interval})"
    title = f"{title} — {bars}"
    fig.suptitle(title, fontsize=10)
    canvas.draw()  # autoscales the axes: data -> pixel transforms are final only from here
    renderer = canvas.get_renderer()
    hotspots, labels = [], []
    height = fig.bbox.height
    for k, (ax, col, p, front) in enumerate(panels):
        xy = ax.transData.transform(list(zip(p[col], p["score"]))) if len(p) else []
        obstacles = [Bbox.from_bounds(x - _MARKER_PX / 2, y - _MARKER_PX / 2, _MARKER_PX, _MARKER_PX) for x, y in xy]
        wanted = [(r[col], r["score"], r["label"]) for (_, r), on in zip(p.iterrows(), front)
                  if on or r["label"] in REFERENCE_LABELS]
        labels += [Label(text, k, tuple(round(float(v), 1) for v in box.extents), free)
                   for text, box, free in _place_labels(ax, renderer, wanted, obstacles)]
        for (_, r), (x, y) in zip(p.iterrows(), xy):
            hotspots.append(Hotspot(r["label"], round(float(x), 1), round(float(height - y), 1),
                                    f"{r['label']} ({r['family']}): {metric} {r['score']:.4g}, "
                                    f"{ax.get_xlabel().split(' (')[0]} {r[col]:.4g}"))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_METADATA)
    return Plot(buf.getvalue(), title, hotspots, labels)


def task_plots(summary: pd.DataFrame) -> dict[str, Plot]:
    """{file name: Plot}: one per task, plus `average.png` over the tasks where higher is better."""
    out = {}
    have = summary[summary["n_seeds"] > 0] if len(summary) else summary
    for task, g in have.groupby("task", sort=True):
        higher = bool(g["higher_is_better"].iloc[0])
        seeds = g["n_seeds"].max()
        out[f"{task}.png"] = figure_png(g, f"{task}", str(g["metric"].iloc[0]), higher,
                                        "95% CI over seeds" if seeds > 1 else None)
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
                                            "mean task metric", True, None, "a mean over tasks, not over seeds")
    return out
