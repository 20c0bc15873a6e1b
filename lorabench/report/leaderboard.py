"""The leaderboard printed at the end of `python -m lorabench run`: one table per task.

Per method label: the task metric's mean over seeds with its 95% interval (seed and evaluation-sample
variance where the trials recorded per-example outcomes: lorabench/report/stats.py), peak memory,
train tokens/s, trainable parameters, adapter size and wall time; the task's trivial baselines and
the report's flags under each table; failed trials are listed with their reason, never dropped.
It is the same computation as `python -m lorabench report` (lorabench/report/tables.py), printed short.
"""
from __future__ import annotations

import math

import pandas as pd

from lorabench.report import tables


def _fmt_params(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    n = float(n)
    for unit, div in (("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    n = float(n)
    for unit, div in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def render(records: list[dict]) -> str:
    """A plain-text leaderboard, one block per task, best first by the task's metric direction."""
    if not records:
        return "no records"
    rep = tables.build(records)
    trials = rep.trials
    walls = trials[trials["status"] == "ok"].groupby(["task", "label"])["wall_s"].median()
    blocks = []
    for task in sorted(set(trials["task"])):
        rows = rep.summary[(rep.summary["task"] == task) & (rep.summary["n_seeds"] > 0)]
        failed = trials[(trials["task"] == task) & (trials["status"] != "ok")]
        if len(rows):
            higher = bool(rows["higher_is_better"].iloc[0]) if rows["higher_is_better"].iloc[0] is not None else True
            metric = rows["metric"].iloc[0]
            table = pd.DataFrame({
                "rank": [int(r) for r in rows["rank"]],
                "method": rows["label"].values,
                metric + (" ↑" if higher else " ↓") + " ± 95%": [
                    f"{s:.4f}" + ("" if math.isnan(c) else f" ± {c:.4f}")
                    for s, c in zip(rows["score"], rows["score_ci95"])],
                "interval over": rows["ci_kind"].values,
                "seeds": rows["n_seeds"].values,
                "peak mem": [_fmt_bytes(v * 2**20) if v == v else "-" for v in rows["peak_rss_mb"]],
                "train tok/s": [f"{v:,.0f}" if v == v and v is not None else "-" for v in rows["train_tokens_per_s"]],
                "trainable": [_fmt_params(v) for v in rows["trainable_params"]],
                "adapter": [_fmt_bytes(v) for v in rows["adapter_bytes"]],
                "wall s": [f"{walls.get((task, lab), float('nan')):.1f}" for lab in rows["label"]],
            })
            body = table.to_string(index=False)
        else:
            body = "(no successful trial)"
        lines = [f"== {task} ==", body]
        b = rep.baselines[rep.baselines["task"] == task]
        if len(b):
            b = b.iloc[0]
            parts = [f"{name} {b[col]:.4f}" + ("" if math.isnan(b[col + '_ci95']) else f" ± {b[col + '_ci95']:.4f}")
                     for name, col in (("majority class", "majority"), ("zero-shot", "zero_shot"))
                     if not math.isnan(b[col])]
            if parts:
                lines.append("trivial baselines: " + "; ".join(parts))
        for _, r in rows[rows["flags"] != ""].iterrows():
            lines.append(f"FLAG {r['label']}: {r['flags']}")
        for _, f in failed.iterrows():
            lines.append(f"FAILED {f['label']} (seed {f['seed']}): {f['error']}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
