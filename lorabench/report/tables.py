"""Records (JSONL dicts) -> pandas tables: per task and method mean and 95% CI over seeds, ranks,
average ranks, paired comparisons against `lora`, failures, and the notes a reader must see.

Everything here is deterministic: rows are sorted by explicit keys (never by input order alone),
numbers are rounded before they are written, and nothing depends on the clock. That is what lets
`python -m lorabench report` regenerate the published tables byte for byte from committed records.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from lorabench.methods.base import FAMILIES
from lorabench.report.stats import mean_ci95, paired

REFERENCE = "lora"  # every method is compared with LoRA (the survey's reference point)

# Fields a record may carry (lorabench/runner/run.py, lorabench/harness/trial.py, the worker and
# lorabench/measure/provenance.py). Anything else is reported as an unknown field and ignored.
KNOWN_FIELDS = frozenset("""
record_version trial_id suite suite_version label method method_options task task_options model seed
overrides started_at finished_at wall_s git_commit versions cpu gpu threads platform status error traceback
metric higher_is_better score metrics split_hash n_train n_eval model_info trainable_params total_params
adapter_bytes train method_config family paper final_loss loss_curve train_tokens_per_s eval_tokens_per_s
train_seconds eval_seconds method_metrics peak_rss_mb rss_after_load_mb trial_seconds
cuda_max_allocated_mb cuda_max_reserved_mb jobs lm_eval
""".split())
REQUIRED = ("task", "label", "method", "seed")

# (column, what it is) of the per-seed quantities aggregated with a mean and a 95% CI.
MEASURES = (
    ("score", "the task metric"),
    ("peak_rss_mb", "peak resident memory of the trial process (MB)"),
    ("train_tokens_per_s", "training throughput (tokens/s, median over steps after warm-up)"),
    ("trainable_params", "trainable parameters"),
    ("adapter_bytes", "saved adapter size (bytes)"),
)


def family_order(family: str) -> int:
    keys = list(FAMILIES)
    return keys.index(family) if family in keys else len(keys)


def family_title(family: str) -> str:
    return FAMILIES.get(family, f"{family} (not a survey family)")


def _family_of(method: str, seen: dict[str, str]) -> str:
    """A method's survey family: from its records, else from the registry, else 'unregistered'."""
    if method in seen:
        return seen[method]
    from lorabench.methods import METHODS
    if method in METHODS:
        try:
            return METHODS.get(method).family
        except Exception:  # a broken method module must not break the report of other methods
            return "unregistered"
    return "unregistered"


def _finite(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f if math.isfinite(f) else float("nan")


@dataclass
class Report:
    trials: pd.DataFrame       # one row per (task, label, seed): the records used
    summary: pd.DataFrame      # one row per (task, label): means, CIs, rank, failures
    average_rank: pd.DataFrame  # one row per label: average rank over tasks, grouped by family
    paired_detail: pd.DataFrame  # one row per (label, task): paired difference against lora
    paired_summary: pd.DataFrame  # one row per label: wins / ties / losses against lora
    failures: pd.DataFrame     # one row per failed trial, with its reason
    notes: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)


def trials_frame(records: list[dict], notes: list[str]) -> pd.DataFrame:
    unknown: dict[str, int] = {}
    rows = []
    families = {r["method"]: r["family"] for r in records
                if isinstance(r.get("method"), str) and isinstance(r.get("family"), str)}
    for i, r in enumerate(records):
        for k in r:
            if k not in KNOWN_FIELDS:
                unknown[k] = unknown.get(k, 0) + 1
        missing = [k for k in REQUIRED if r.get(k) is None]
        if missing:
            notes.append(f"Record {i + 1} lacks {', '.join(missing)}; it cannot be placed in a table and is left out.")
            continue
        try:
            seed = int(r["seed"])
        except (TypeError, ValueError):
            notes.append(f"Record {i + 1} has seed {r['seed']!r}, not an integer; it is left out.")
            continue
        status = r.get("status") if r.get("status") in ("ok", "failed") else "failed"
        error = r.get("error")
        if r.get("status") not in ("ok", "failed"):
            error = f"record has status {r.get('status')!r} (expected 'ok' or 'failed')"
        score = _finite(r.get("score"))
        if status == "ok" and math.isnan(score):
            status, error = "failed", f"recorded ok but its score {r.get('score')!r} is not a finite number"
        train = r.get("train") if isinstance(r.get("train"), dict) else {}
        config = r.get("method_config") if isinstance(r.get("method_config"), dict) else {}
        options = r.get("method_options") if isinstance(r.get("method_options"), dict) else {}
        curve = r.get("loss_curve") if isinstance(r.get("loss_curve"), list) else []
        rows.append({
            "task": str(r["task"]), "label": str(r["label"]), "method": str(r["method"]),
            "family": _family_of(str(r["method"]), families), "seed": seed, "status": status,
            "error": None if status == "ok" else str(error or "no reason recorded"),
            "suite": r.get("suite"), "suite_version": r.get("suite_version"), "trial_id": r.get("trial_id"),
            "metric": r.get("metric"), "higher_is_better": r.get("higher_is_better"),
            "score": score if status == "ok" else float("nan"),
            "peak_rss_mb": _finite(r.get("peak_rss_mb")),
            "train_tokens_per_s": _finite(r.get("train_tokens_per_s")),
            "trainable_params": _finite(r.get("trainable_params")),
            "adapter_bytes": _finite(r.get("adapter_bytes")),
            "wall_s": _finite(r.get("wall_s")),
            "steps": train.get("steps"), "batch_size": train.get("batch_size"),
            "loss_every": train.get("loss_curve_every"), "rank": config.get("rank", options.get("rank")),
            "loss_curve": [float(x) for x in curve if _finite(x) == _finite(x)],
            "order": i,
        })
    if unknown:
        listed = ", ".join(f"{k} ({n} record{'s' if n > 1 else ''})" for k, n in sorted(unknown.items()))
        notes.append(f"Unknown record fields, ignored by this report (written by a newer or foreign writer?): {listed}.")
    cols = ["task", "label", "method", "family", "seed", "status", "error", "suite", "suite_version", "trial_id",
            "metric", "higher_is_better", "score", "peak_rss_mb", "train_tokens_per_s", "trainable_params",
            "adapter_bytes", "wall_s", "steps", "batch_size", "loss_every", "rank", "loss_curve", "order"]
    df = pd.DataFrame(rows, columns=cols)
    dup = df.duplicated(["task", "label", "seed"], keep="last")
    if dup.any():
        notes.append(f"{int(dup.sum())} record(s) repeat a (task, method label, seed) already recorded; "
                     f"the last one of each in file order is used.")
        df = df[~dup]
    # Fill the metric of failed trials from the task's successful ones (a failed record has none).
    for task, g in df.groupby("task"):
        ok = g[g["status"] == "ok"]
        if len(ok):
            df.loc[df["task"] == task, "metric"] = ok["metric"].iloc[0]
            df.loc[df["task"] == task, "higher_is_better"] = bool(ok["higher_is_better"].iloc[0])
    return df.sort_values(["task", "label", "seed"], kind="stable").reset_index(drop=True)


def summarize(trials: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    rows = []
    for (task, label), g in trials.groupby(["task", "label"], sort=True):
        ok = g[g["status"] == "ok"]
        row = {"task": task, "label": label, "method": g["method"].iloc[0], "family": g["family"].iloc[0],
               "metric": g["metric"].iloc[0], "higher_is_better": g["higher_is_better"].iloc[0],
               "seeds": ",".join(str(s) for s in sorted(ok["seed"])), "n_seeds": len(ok),
               "n_failed": int((g["status"] != "ok").sum())}
        for col, _ in MEASURES:
            mean, hw, _n = mean_ci95(ok[col]) if len(ok) else (float("nan"), float("nan"), 0)
            row[col] = mean
            row[col + "_ci95"] = hw
        rows.append(row)
    s = pd.DataFrame(rows)
    if s.empty:
        return s
    s["rank"] = float("nan")
    for task, g in s.groupby("task"):
        have = g[g["n_seeds"] > 0]
        if have.empty:
            continue
        higher = bool(have["higher_is_better"].iloc[0]) if have["higher_is_better"].iloc[0] is not None else True
        s.loc[have.index, "rank"] = have["score"].round(12).rank(ascending=not higher, method="min")
    # Missing seeds: a method ran (ok) on fewer seeds than the task's other methods were given.
    for task, g in trials.groupby("task"):
        expected = sorted(set(g["seed"]))
        for label, h in g.groupby("label"):
            absent = sorted(set(expected) - set(h["seed"]))
            if absent:
                notes.append(f"{label} on {task}: no record for seed(s) {', '.join(map(str, absent))} "
                             f"(other methods have seeds {', '.join(map(str, expected))}); its mean and CI use "
                             f"{len(h[h['status'] == 'ok'])} seed(s).")
    budgets = trials[trials["status"] == "ok"].groupby("task")[["steps", "batch_size"]].nunique()
    for task, b in budgets.iterrows():
        if (b > 1).any():
            notes.append(f"{task}: trials were trained with different budgets (steps or batch size); "
                         f"paired comparisons only pair trials with the same budget.")
    return s.sort_values(["task", "rank", "label"], na_position="last", kind="stable").reset_index(drop=True)


def average_ranks(summary: pd.DataFrame) -> pd.DataFrame:
    if summary.empty:
        return pd.DataFrame(columns=["family", "label", "method", "average_rank", "n_tasks", "tasks"])
    have = summary[summary["n_seeds"] > 0]
    rows = []
    for label, g in summary.groupby("label"):
        h = have[have["label"] == label]
        rows.append({"family": g["family"].iloc[0], "label": label, "method": g["method"].iloc[0],
                     "average_rank": h["rank"].mean() if len(h) else float("nan"),
                     "n_tasks": len(h), "tasks": ",".join(sorted(h["task"]))})
    out = pd.DataFrame(rows)
    out["_f"] = out["family"].map(family_order)
    out = out.sort_values(["_f", "family", "average_rank", "label"], na_position="last", kind="stable")
    return out.drop(columns="_f").reset_index(drop=True)


def compare_with_reference(trials: pd.DataFrame, reference: str = REFERENCE) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Paired t-test over seeds of each method against `reference` per task, at the same budget.

    Differences are oriented so that positive = better than the reference (for perplexity, lower
    is better). A 'win' is a 95% CI of the mean paired difference entirely above zero.
    """
    detail_cols = ["family", "label", "task", "n_pairs", "diff", "diff_ci95", "diff_low", "diff_high", "verdict"]
    ok = trials[trials["status"] == "ok"]
    ref = ok[ok["label"] == reference]
    rows = []
    for (label, task), g in ok[ok["label"] != reference].groupby(["label", "task"], sort=True):
        r = ref[ref["task"] == task]
        if r.empty:
            continue
        m = g.merge(r, on=["seed", "steps", "batch_size"], suffixes=("", "_ref"))
        sign = 1.0 if bool(g["higher_is_better"].iloc[0]) else -1.0
        p = paired(sign * (m["score"] - m["score_ref"]))
        rows.append({"family": g["family"].iloc[0], "label": label, "task": task, "n_pairs": p.n,
                     "diff": p.mean, "diff_ci95": p.ci95, "diff_low": p.low, "diff_high": p.high,
                     "verdict": p.verdict()})
    detail = pd.DataFrame(rows, columns=detail_cols)
    srows = []
    for label, g in detail.groupby("label", sort=True):
        v = g["verdict"].value_counts()
        srows.append({"family": g["family"].iloc[0], "label": label, "tasks": len(g),
                      "wins": int(v.get("win", 0)), "ties": int(v.get("tie", 0)),
                      "losses": int(v.get("loss", 0)), "untested": int(v.get("untested", 0))})
    summ = pd.DataFrame(srows, columns=["family", "label", "tasks", "wins", "ties", "losses", "untested"])
    for df in (detail, summ):
        df["_f"] = df["family"].map(family_order)
    detail = detail.sort_values(["_f", "family", "label", "task"], kind="stable").drop(columns="_f")
    summ = summ.sort_values(["_f", "family", "label"], kind="stable").drop(columns="_f")
    return detail.reset_index(drop=True), summ.reset_index(drop=True)


def failures_frame(trials: pd.DataFrame) -> pd.DataFrame:
    f = trials[trials["status"] != "ok"][["task", "family", "label", "seed", "error"]]
    return f.sort_values(["task", "label", "seed"], kind="stable").reset_index(drop=True)


def build(records: list[dict], notes: list[str] | None = None) -> Report:
    """`notes`: what the caller already knows the reader must see (lines the records reader skipped)."""
    notes = list(notes or [])
    trials = trials_frame(records, notes)
    summary = summarize(trials, notes)
    detail, summ = compare_with_reference(trials)
    if len(trials) and not (trials["label"] == REFERENCE).any():
        notes.append(f"No '{REFERENCE}' trials in these records: the paired comparison against {REFERENCE} is empty.")
    failures = failures_frame(trials)
    if len(failures):
        notes.append(f"{len(failures)} trial(s) failed; they are listed with their reason under 'Failed trials' "
                     f"and left out of means, ranks and comparisons.")
    return Report(trials=trials, summary=summary, average_rank=average_ranks(summary), paired_detail=detail,
                  paired_summary=summ, failures=failures, notes=notes, records=records)
