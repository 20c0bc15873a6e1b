"""The survey's headline claims (arXiv 2407.11046), checked against the records.

Every verdict is computed from paired differences (same task, same seed, same training budget, and
the same evaluation example where the trials recorded per-example outcomes) with a 95% interval that
carries seed and evaluation-sample variance (lorabench/report/stats.py); nothing here is written by
hand. A claim whose methods have no records is reported as "not yet measured", one whose interval is
too wide as "inconclusive", and one the numbers contradict as "does not hold".

Tests used:
- "matches" / "approaches" (non-inferiority): holds when the lower end of the 95% CI of
  (method - reference) is above -margin; does not hold when its upper end is below -margin.
- "beats" (superiority): holds when the CI's lower end is above 0; does not hold when its upper
  end is below 0 (the reference is better).
- "converges faster early": read off the training loss over the first quarter of the run (the mean of
  the loss curve's first quarter of points), paired by seed, when each point of both curves averages at
  least MIN_LOSS_WINDOW steps: trials of one seed train on the same batches in the same order
  (`Task.train_batches(seed)`), so the difference is the methods', and a quarter of the run averages
  tens of batches. It is the quantity both papers plot for the claim (PiSSA, arXiv 2404.02948, sec. 5.1
  and its loss figures; LoRA+, arXiv 2402.12354, sec. 4: train loss against steps). The validation
  curve's first quarter (one or two points on the steep part of the curve, 200-500 examples each) is
  shown beside it (`extra`): on the claims board it carried mostly seed variance (MDD 4-20 points on
  rt-sentiment and QuaRTz), so it is the verdict only where no loss curve of long enough windows was
  recorded. Single-batch losses are never read (noise; a first point at step 1 is the same pre-update
  loss for every method). Holds when the method's early score is better with the CI excluding 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from lorabench.report.stats import seed_interval

MARGIN_ABSOLUTE = 0.01     # one accuracy point for metrics in [0, 1]
BOUNDED_METRICS = {"accuracy", "exact_match"}
MARGIN_RELATIVE = 0.01     # otherwise 1% of the reference's mean
MIN_LOSS_WINDOW = 10       # steps a loss-curve point must average to be read as convergence
# Issue 15: a finding that stays inconclusive still counts as measured when its test could have found a
# difference of this size (the minimum detectable difference at 80% power, stats.Estimate.mdd80).
POWERED_MDD = 0.015        # 1.5 accuracy points for metrics in [0, 1]


@dataclass(frozen=True)
class Claim:
    key: str
    text: str
    methods: tuple[str, ...]       # registry names that implement the claim's method (first found is used)
    reference: str
    test: str                      # "noninferior" | "superior" | "early-loss"
    source: str                    # where the claim is made


CLAIMS = (
    Claim("qlora", "QLoRA matches 16-bit LoRA", ("qlora",), "lora", "noninferior",
          "QLoRA, arXiv 2305.14314, section 5; survey section 7.3"),
    Claim("full", "LoRA approaches full fine-tuning", ("lora",), "full", "noninferior",
          "LoRA, arXiv 2106.09685, section 5; survey section 2"),
    Claim("dora", "DoRA beats LoRA at equal rank", ("dora",), "lora", "superior",
          "DoRA, arXiv 2402.09353, section 5; survey section 4.1"),
    Claim("vera", "VeRA matches LoRA with far fewer trainable parameters", ("vera",), "lora", "noninferior",
          "VeRA, arXiv 2310.11454, section 4; survey section 7.2"),
    Claim("pissa", "PiSSA converges faster than LoRA early in training", ("pissa",), "lora", "early-loss",
          "PiSSA, arXiv 2404.02948, section 5.1; survey section 4.3"),
    Claim("loraplus", "LoRA+ speeds up convergence", ("lora-plus",), "lora",
          "early-loss", "LoRA+, arXiv 2402.12354, section 4; survey section 4.3"),
)


def margin(metric: str, reference_mean: float) -> float:
    return MARGIN_ABSOLUTE if metric in BOUNDED_METRICS else MARGIN_RELATIVE * abs(reference_mean)


def early_loss(curve: list[float]) -> float:
    """Mean training loss over the first quarter of the recorded loss curve (at least one window)."""
    if not curve:
        return float("nan")
    k = max(1, math.ceil(len(curve) / 4))
    return math.fsum(curve[:k]) / k


def early_val(curve: list) -> float:
    """Mean validation score over the first quarter of the validation curve [(step, score), ...]."""
    if not curve:
        return float("nan")
    k = max(1, math.ceil(len(curve) / 4))
    return math.fsum(float(p[1]) for p in curve[:k]) / k


def _verdict(test: str, low: float, high: float, n: int, m: float) -> str:
    if n < 2:
        return "inconclusive (fewer than 2 paired seeds)"
    if math.isnan(low):  # no variance at all is not certainty: nothing can be inferred
        return "inconclusive (no interval: nothing varies)"
    floor = -m if test == "noninferior" else 0.0
    if low > floor:
        return "holds"
    if high < floor:
        return "does not hold"
    return "inconclusive"


def _pairs(trials: pd.DataFrame, method: str, reference: str, task: str) -> pd.DataFrame:
    ok = trials[(trials["status"] == "ok") & (trials["task"] == task)]
    a = ok[ok["label"] == method]
    b = ok[ok["label"] == reference]
    return a.merge(b, on=["seed", "steps", "batch_size"], suffixes=("", "_ref"))


def evaluate(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (claim, task) measured, or one 'not yet measured' row per claim."""
    rows = []
    ok = trials[trials["status"] == "ok"] if len(trials) else trials
    labels = set(ok["label"]) if len(ok) else set()
    for c in CLAIMS:
        method = next((m for m in c.methods if m in labels), None)
        base = {"claim": c.text, "source": c.source, "method": method or c.methods[0], "reference": c.reference}
        if method is None or c.reference not in labels:
            absent = [x for x in (c.methods[0] if method is None else None, None if c.reference in labels else c.reference) if x]
            rows.append(base | {"task": "", "metric": "", "n_pairs": 0, "quantity": "", "diff": float("nan"),
                                "diff_ci95": float("nan"), "mdd80": float("nan"), "margin": float("nan"),
                                "extra": "", "verdict": "not yet measured",
                                "why": f"no successful trials of {' and '.join(absent)} in these records"})
            continue
        tasks = sorted(set(ok[ok["label"] == method]["task"]) & set(ok[ok["label"] == c.reference]["task"]))
        if not tasks:
            rows.append(base | {"task": "", "metric": "", "n_pairs": 0, "quantity": "", "diff": float("nan"),
                                "diff_ci95": float("nan"), "mdd80": float("nan"), "margin": float("nan"),
                                "extra": "", "verdict": "not yet measured",
                                "why": f"{method} and {c.reference} never ran on the same task"})
            continue
        for task in tasks:
            from lorabench.report.tables import paired_estimate
            m = _pairs(trials, method, c.reference, task)
            extra, why = "", ""
            if c.test == "early-loss":
                higher = bool(m["higher_is_better"].iloc[0]) if len(m) else True
                sign = 1.0 if higher else -1.0
                has_val = bool(len(m)) and all(len(x) for x in m["val_curve"]) and all(
                    len(x) for x in m["val_curve_ref"])
                has_loss = bool(len(m)) and all(len(x) for x in m["loss_curve"]) and all(
                    len(x) for x in m["loss_curve_ref"])
                windows = set(m["loss_every"]) | set(m["loss_every_ref"]) if len(m) else set()
                long_windows = all(isinstance(w, int) and w >= MIN_LOSS_WINDOW for w in windows)
                val = seed_interval(sign * (m["val_curve"].map(early_val) - m["val_curve_ref"].map(early_val))) \
                    if has_val else None
                loss = seed_interval(m["loss_curve_ref"].map(early_loss) - m["loss_curve"].map(early_loss))
                if has_loss and long_windows:
                    e = loss
                    quantity = ("early training loss (reference - method, first quarter of the loss curve, "
                                "same batches)")
                    if val is not None:
                        extra = (f"early validation score (method - reference): {val.mean:+.4f}"
                                 + (f" ± {val.ci95:.4f}" if math.isfinite(val.ci95) else ""))
                elif val is not None:
                    e = val
                    quantity = "early validation score (method - reference, first quarter of the validation curve)"
                else:
                    e = loss
                    quantity = "early training loss (reference - method, first quarter of the loss curve)"
                    if not has_loss:
                        why = "no validation or loss curve recorded"
                    else:
                        w = min((w for w in windows if isinstance(w, int)), default=None)
                        why = (f"no validation curve, and the loss curve's points average "
                               f"{'an unrecorded number of' if w is None else w} step(s): single-batch noise, not "
                               f"convergence (needs points of at least {MIN_LOSS_WINDOW} steps)")
                mg = 0.0
                n = len(m)
            else:
                a = trials[(trials["status"] == "ok") & (trials["task"] == task) & (trials["label"] == method)]
                b = trials[(trials["status"] == "ok") & (trials["task"] == task) & (trials["label"] == c.reference)]
                e, _same, n = paired_estimate(a, b)
                metric = str(m["metric"].iloc[0]) if len(m) else ""
                quantity = f"{metric} (method - reference)"
                mg = margin(metric, float(m["score_ref"].mean())) if c.test == "noninferior" and len(m) else 0.0
            metric = str(m["metric"].iloc[0]) if len(m) else ""
            if c.key == "vera" and len(m):
                ratio = float(m["trainable_params"].mean() / m["trainable_params_ref"].mean())
                extra = f"trainable parameters {ratio:.3g}x of LoRA's"
            if c.key == "dora" and len(m) and (m["rank"].astype(str) != m["rank_ref"].astype(str)).any():
                why = "ranks differ between DoRA and LoRA; not an equal-rank comparison"
            verdict = _verdict("noninferior" if c.test == "noninferior" else "superior", e.low, e.high, n, mg)
            if why:
                verdict = "inconclusive"
            rows.append(base | {"task": task, "metric": metric, "n_pairs": n, "quantity": quantity, "diff": e.mean,
                                "diff_ci95": e.ci95, "mdd80": e.mdd80,
                                "margin": mg if c.test == "noninferior" else float("nan"),
                                "extra": extra, "verdict": verdict, "why": why})
    return pd.DataFrame(rows)


def powered(row) -> bool:
    """An inconclusive row whose test could have found a difference of POWERED_MDD (accuracy-like
    metrics) at 80% power: the data rule out a difference that large, so the row is measured."""
    mdd = row["mdd80"]
    on_scale = row.get("metric") in BOUNDED_METRICS and not str(row["quantity"]).startswith("early training loss")
    return isinstance(mdd, float) and math.isfinite(mdd) and mdd <= POWERED_MDD and on_scale


def overall(rows: pd.DataFrame, claim: str) -> str:
    g = rows[rows["claim"] == claim]
    if (g["verdict"] == "not yet measured").all():
        return "not yet measured"
    counts = g["verdict"].map(lambda v: v.split(" (")[0]).value_counts()
    n = len(g)
    parts = []
    for verdict in ("holds", "does not hold", "inconclusive"):
        if verdict not in counts:
            continue
        part = f"{verdict} on {counts[verdict]} of {n} task{'s' if n > 1 else ''}"
        if verdict == "inconclusive":
            k = sum(1 for _, r in g.iterrows() if r["verdict"].startswith("inconclusive") and powered(r))
            if k:
                part += (f" ({k} of them powered: a difference of {100 * POWERED_MDD:g} points or more would have "
                         f"been found with 80% power)")
        parts.append(part)
    return "; ".join(parts)
