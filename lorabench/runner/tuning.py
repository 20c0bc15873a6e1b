"""Choosing a learning rate from a grid on the validation split: one rule for the runner and the report.

A suite's `lr_grid` runs each method at several rates. With `tune_seeds`, only those seeds run the
whole grid; every other seed then runs once, at the rate the tuning seeds chose, which the runner
reads from the records when the grid's trials are all recorded (lorabench/runner/run.py). The report
(lorabench/report/tables.py) makes the same choice from the same records, comparing the rates on the
seeds every rate ran, so a board shows the grid, its validation scores and the rate every other
table reports.
"""
from __future__ import annotations

import math


def choose_rate(scores: dict[float, list[float]], higher: bool = True) -> float | None:
    """The rate with the best mean validation score (ties: the smaller rate); None when any rate has no
    finite score (nothing can be chosen yet)."""
    means = {}
    for lr, vals in scores.items():
        vals = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
        if not vals:
            return None
        means[lr] = sum(vals) / len(vals)
    if not means:
        return None
    return sorted(means, key=lambda lr: (-means[lr] if higher else means[lr], lr))[0]
