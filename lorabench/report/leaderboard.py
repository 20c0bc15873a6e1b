"""The leaderboard printed at the end of `python -m lorabench run`: one table per task.

Per method label: the task metric's mean over seeds with a 95% confidence interval (Student t),
peak memory, train tokens/s, trainable parameters, adapter size and wall time; failed trials are
listed with their reason, never dropped.
"""
from __future__ import annotations

import math

import pandas as pd

from lorabench.report.stats import mean_ci95


def ci95(values: pd.Series) -> float:
    """Half-width of the 95% Student-t confidence interval of the mean (NaN for one value)."""
    return mean_ci95(values.dropna())[1]


def records_frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        rows.append({
            "task": r.get("task"), "label": r.get("label"), "method": r.get("method"),
            "family": r.get("family"), "seed": r.get("seed"), "status": r.get("status", "unknown"),
            "metric": r.get("metric"), "higher_is_better": r.get("higher_is_better"),
            "score": r.get("score"), "peak_rss_mb": r.get("peak_rss_mb"),
            "train_tokens_per_s": r.get("train_tokens_per_s"), "trainable_params": r.get("trainable_params"),
            "adapter_bytes": r.get("adapter_bytes"), "wall_s": r.get("wall_s"), "error": r.get("error"),
        })
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    ok = df[df["status"] == "ok"]
    agg = ok.groupby(["task", "label"], sort=False).agg(
        method=("method", "first"), metric=("metric", "first"), higher=("higher_is_better", "first"),
        score=("score", "mean"), ci95=("score", ci95), seeds=("seed", "nunique"),
        peak_rss_mb=("peak_rss_mb", "median"), train_tokens_per_s=("train_tokens_per_s", "median"),
        trainable_params=("trainable_params", "first"), adapter_bytes=("adapter_bytes", "first"),
        wall_s=("wall_s", "median"),
    ).reset_index()
    return agg


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
    df = records_frame(records)
    summary = summarize(df)
    blocks = []
    for task in dict.fromkeys(df["task"]):
        rows = summary[summary["task"] == task]
        failed = df[(df["task"] == task) & (df["status"] != "ok")]
        if len(rows):
            higher = bool(rows["higher"].iloc[0])
            metric = rows["metric"].iloc[0]
            rows = rows.sort_values("score", ascending=not higher)
            table = pd.DataFrame({
                "rank": range(1, len(rows) + 1),
                "method": rows["label"].values,
                metric + (" ↑" if higher else " ↓"): [
                    f"{s:.4f}" + ("" if math.isnan(c) else f" ± {c:.4f}") for s, c in zip(rows["score"], rows["ci95"])],
                "seeds": rows["seeds"].values,
                "peak mem": [_fmt_bytes(v * 2**20) if v == v else "-" for v in rows["peak_rss_mb"]],
                "train tok/s": [f"{v:,.0f}" if v == v and v is not None else "-" for v in rows["train_tokens_per_s"]],
                "trainable": [_fmt_params(v) for v in rows["trainable_params"]],
                "adapter": [_fmt_bytes(v) for v in rows["adapter_bytes"]],
                "wall s": [f"{v:.1f}" for v in rows["wall_s"]],
            })
            body = table.to_string(index=False)
        else:
            body = "(no successful trial)"
        lines = [f"== {task} ==", body]
        for _, f in failed.iterrows():
            lines.append(f"FAILED {f['label']} (seed {f['seed']}): {f['error']}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
