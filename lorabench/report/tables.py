"""Records (JSONL dicts) -> pandas tables: per task and method mean and 95% interval, ranks,
average ranks, paired comparisons against `lora`, trivial baselines, learning-rate selection,
flags on degenerate rows, failures, and the notes a reader must see.

Intervals and tests use the per-example outcomes the trials record (seed and evaluation-sample
variance together, paired by seed and example: lorabench/report/stats.py); records without them
(older boards) fall back to Student-t over seeds, and the table says which was used.

Everything here is deterministic: rows are sorted by explicit keys (never by input order alone),
numbers are rounded before they are written, and nothing depends on the clock. That is what lets
`python -m lorabench report` regenerate the published tables byte for byte from committed records.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lorabench.methods.base import FAMILIES
from lorabench.report.curves import curves_frame
from lorabench.runner.tuning import choose_rate
from lorabench.report.stats import Estimate, crossed, holm, mean_ci95, seed_interval, verdict
from lorabench.tasks.base import Outcomes

REFERENCE = "lora"  # every method is compared with LoRA (the survey's reference point)

# Fields a record may carry (lorabench/runner/run.py, lorabench/harness/trial.py, the scenarios, whose own
# report sections read federated, continual, mixture and reuse, the worker and
# lorabench/measure/provenance.py). Anything else is reported as an unknown field and ignored.
KNOWN_FIELDS = frozenset("""
record_version trial_id suite suite_version label method method_options task task_options model seed
overrides started_at finished_at wall_s git_commit versions cpu gpu threads platform status error traceback
metric higher_is_better score metrics split_hash n_train n_eval model_info trainable_params total_params
adapter_bytes train method_config family paper final_loss loss_curve train_tokens_per_s eval_tokens_per_s
train_seconds eval_seconds method_metrics peak_rss_mb rss_after_load_mb trial_seconds trial_cpu_seconds
cuda_max_allocated_mb cuda_max_reserved_mb jobs lm_eval node backend node_ip ray_node_id attempts lost_attempts
n_val val_score val_curve outcomes majority_label trained_steps cross_task federated continual mixture reuse
load
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
    trials: pd.DataFrame       # one row per (task, label, seed): the records used (the chosen learning rate)
    summary: pd.DataFrame      # one row per (task, label): means, intervals, rank, flags, failures
    average_rank: pd.DataFrame  # one row per label: average rank over tasks, grouped by family
    paired_detail: pd.DataFrame  # one row per (label, task): paired difference against lora, Holm-corrected
    paired_summary: pd.DataFrame  # one row per label: wins / ties / losses against lora
    failures: pd.DataFrame     # one row per failed trial, with its reason
    notes: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    baselines: pd.DataFrame = field(default_factory=pd.DataFrame)     # per task: trivial baselines, LoRA against them
    lr_selection: pd.DataFrame = field(default_factory=pd.DataFrame)  # per (task, label, lr): validation score, chosen
    aggregate: pd.DataFrame = field(default_factory=pd.DataFrame)     # per label: IQM, P(improvement over lora)
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)        # per trial with a validation curve: reach95
    all_trials: pd.DataFrame = field(default_factory=pd.DataFrame)    # trials at every learning rate of a grid


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
        outcomes = None
        if status == "ok" and isinstance(r.get("outcomes"), dict):
            try:
                outcomes = Outcomes.from_record(r["outcomes"])
            except (KeyError, TypeError, ValueError) as e:
                notes.append(f"Record {i + 1} ({r['label']} on {r['task']}, seed {seed}): unreadable per-example "
                             f"outcomes ({e}); its interval uses seeds only.")
        val_curve = r.get("val_curve") if isinstance(r.get("val_curve"), list) else []
        lr = train.get("lr_used", train.get("lr"))
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
            "lr": _finite(lr), "val_score": _finite(r.get("val_score")),
            "val_curve": [(int(p[0]), float(p[1])) for p in val_curve
                          if isinstance(p, list) and len(p) == 2 and _finite(p[1]) == _finite(p[1])],
            "outcomes": outcomes, "outcome_hash": (r["outcomes"].get("hash") if outcomes is not None else None),
            "majority_label": r.get("majority_label") if isinstance(r.get("majority_label"), int) else None,
            # steps actually trained; older records lack it, and there no final loss means nothing trained
            "trained_steps": r["trained_steps"] if isinstance(r.get("trained_steps"), int) else (
                0 if status == "ok" and r.get("final_loss") is None and "trained_steps" not in r else None),
            "order": i,
        })
    if unknown:
        listed = ", ".join(f"{k} ({n} record{'s' if n > 1 else ''})" for k, n in sorted(unknown.items()))
        notes.append(f"Unknown record fields, ignored by this report (written by a newer or foreign writer?): {listed}.")
    cols = ["task", "label", "method", "family", "seed", "status", "error", "suite", "suite_version", "trial_id",
            "metric", "higher_is_better", "score", "peak_rss_mb", "train_tokens_per_s", "trainable_params",
            "adapter_bytes", "wall_s", "steps", "batch_size", "loss_every", "rank", "loss_curve", "lr", "val_score",
            "val_curve", "outcomes", "outcome_hash", "majority_label", "trained_steps", "order"]
    df = pd.DataFrame(rows, columns=cols)
    # A learning-rate grid gives several trials per (task, label, seed): rows are unique per rate.
    dup = df.duplicated(["task", "label", "seed", "lr"], keep="last")
    if dup.any():
        notes.append(f"{int(dup.sum())} record(s) repeat a (task, method label, seed, learning rate) already recorded; "
                     f"the last one of each in file order is used.")
        df = df[~dup]
    # Fill the metric of failed trials from the task's successful ones (a failed record has none).
    for task, g in df.groupby("task"):
        ok = g[g["status"] == "ok"]
        if len(ok):
            df.loc[df["task"] == task, "metric"] = ok["metric"].iloc[0]
            df.loc[df["task"] == task, "higher_is_better"] = bool(ok["higher_is_better"].iloc[0])
    return df.sort_values(["task", "label", "seed", "lr"], kind="stable").reset_index(drop=True)


SELECTORS = ("tasks=", "methods=", "seeds=")  # overrides that pick trials of a suite without changing any


def suite_grids(records: list[dict]) -> dict[tuple[str, str], list[float]]:
    """(task, label) -> the learning rates of the grid its trials belong to, read from the suite files as they are now
    (`Suite.grid_rates`) with the records' overrides other than the selectors (an `lr_grid=1` changes the grid).
    Left out where the suite file is missing, its version is not the records', or records of one (task, label) were
    run under different grids: there the grid is what the records hold."""
    from lorabench.runner.suite import load_suite
    groups: dict[tuple, set[tuple[str, str]]] = {}
    for r in records:
        if r.get("suite") is None or r.get("task") is None or r.get("label") is None:
            continue
        over = tuple(sorted(o for o in (r.get("overrides") or []) if isinstance(o, str) and not o.startswith(SELECTORS)))
        groups.setdefault((str(r["suite"]), r.get("suite_version"), over), set()).add((str(r["task"]), str(r["label"])))
    found: dict[tuple[str, str], set[tuple[float, ...] | None]] = {}
    for (suite, version, over), pairs in sorted(groups.items(), key=lambda kv: repr(kv[0])):
        try:
            s = load_suite(suite, list(over))
        except Exception:  # a foreign, renamed or since-changed suite: its grid is not known here
            s = None
        for pair in pairs:
            grid = s.grid_rates(*pair) if s is not None and s.version == version else None
            found.setdefault(pair, set()).add(None if grid is None else tuple(grid))
    return {pair: list(next(iter(g))) for pair, g in found.items() if len(g) == 1 and None not in g}


def select_learning_rates(trials: pd.DataFrame, notes: list[str],
                          grids: dict[tuple[str, str], list[float]] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Where a (task, label) ran at several learning rates, keep the rate with the best mean validation
    score over the seeds every rate ran (ties: the smaller rate); the test split never takes part in
    the choice. `grids` ((task, label) -> the rates of its grid, `suite_grids`) tells a partial grid: while some
    of its rates are not recorded, the best rate so far is `leading`, not `chosen` (the runner waits for the whole
    grid before it runs the other seeds, lorabench/runner/suite.py `chosen_rate`), and a note says so.

    Returns (the trials at the chosen or leading rates plus every failed trial, the selection table)."""
    cols = ["task", "label", "lr", "n_seeds", "val_score", "chosen", "leading", "rates_recorded", "grid_rates"]
    ok = trials[trials["status"] == "ok"]
    rows, drop = [], []
    for (task, label), g in ok.groupby(["task", "label"], sort=True):
        rates = sorted(set(g["lr"].dropna()))
        grid = (grids or {}).get((task, label))
        partial = grid is not None and not set(grid) <= set(rates)
        if not rates or (len(rates) < 2 and not partial):   # (records without a rate: nothing to select)
            continue
        # Compare the rates on the seeds every rate has (a grid tuned on seed 0, then the chosen rate run on
        # more seeds, is chosen exactly as it was when tuned); all seeds where they share none.
        common = set.intersection(*(set(g[g["lr"] == lr]["seed"]) for lr in rates))
        sel = g[g["seed"].isin(common)] if common else g
        means = {lr: sel[sel["lr"] == lr]["val_score"].mean() for lr in rates}
        higher = bool(g["higher_is_better"].iloc[0]) if g["higher_is_better"].iloc[0] is not None else True
        chosen = choose_rate({lr: list(sel[sel["lr"] == lr]["val_score"]) for lr in rates}, higher)
        if chosen is None:
            chosen = rates[len(rates) // 2]
            notes.append(f"{label} on {task}: ran at {len(rates)} learning rates but some trials have no validation "
                         f"score, so none can be chosen on validation; the middle rate {chosen:g} is reported.")
        recorded = len(set(rates) & set(grid)) if grid is not None else len(rates)
        if partial:
            missing = ", ".join(f"{lr:g}" for lr in grid if lr not in set(rates))
            notes.append(f"{label} on {task}: {recorded} of its grid's {len(grid)} learning rates recorded (not yet "
                         f"{missing}); the tables report the leading rate so far, {chosen:g}, not a choice.")
        for lr in rates:
            rows.append({"task": task, "label": label, "lr": lr, "n_seeds": int((g["lr"] == lr).sum()),
                         "val_score": means[lr], "chosen": lr == chosen and not partial,
                         "leading": lr == chosen and partial, "rates_recorded": recorded,
                         "grid_rates": len(grid) if grid is not None else None})
        drop += list(g[g["lr"] != chosen].index)
    table = pd.DataFrame(rows, columns=cols)
    table["grid_rates"] = table["grid_rates"].astype("Int64")   # empty where the grid is not known
    return trials.drop(index=drop), table


def outcome_table(g: pd.DataFrame) -> tuple[np.ndarray | None, str]:
    """The seeds x examples table of correct (1/0) of one method's successful trials on one task, or
    (None, why) when it cannot be formed (some trial lacks outcomes, or they were scored on different examples)."""
    if g.empty:
        return None, "no successful trials"
    if g["outcomes"].isna().any():
        return None, "records without per-example outcomes"
    if g["outcome_hash"].nunique() != 1:
        return None, "trials scored on different evaluation examples"
    return np.array([o.correct for o in g.sort_values("seed")["outcomes"]], dtype=np.float64), ""


def score_estimate(g: pd.DataFrame) -> Estimate:
    """The score's estimate: seeds x examples where per-example outcomes exist, else seeds only."""
    x, _ = outcome_table(g)
    if x is not None and len(x[0]):
        return crossed(x)
    return seed_interval(g["score"])


def summarize(trials: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    rows = []
    for (task, label), g in trials.groupby(["task", "label"], sort=True):
        ok = g[g["status"] == "ok"]
        row = {"task": task, "label": label, "method": g["method"].iloc[0], "family": g["family"].iloc[0],
               "metric": g["metric"].iloc[0], "higher_is_better": g["higher_is_better"].iloc[0],
               "seeds": ",".join(str(s) for s in sorted(ok["seed"])), "n_seeds": len(ok),
               "n_failed": int((g["status"] != "ok").sum()),
               "lr": float(ok["lr"].iloc[0]) if len(ok) and ok["lr"].nunique() == 1 else float("nan")}
        for col, _ in MEASURES:
            if col == "score":
                e = score_estimate(ok) if len(ok) else seed_interval([])
                row["score"], row["score_ci95"], row["ci_kind"] = e.mean, e.ci95, e.kind
                continue
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
    kinds = sorted(set(s["ci_kind"]) - {"seeds x examples"})
    if kinds:
        which = "; ".join(f"{k}: {int((s['ci_kind'] == k).sum())} row(s)" for k in kinds)
        notes.append(f"Not every interval carries both seed and evaluation-sample variance ({which}): records without "
                     f"per-example outcomes give intervals over seeds only, which leave out the evaluation sample.")
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


def paired_estimate(g: pd.DataFrame, r: pd.DataFrame) -> tuple[Estimate, bool, int]:
    """Method g against reference r on one task, paired by seed and budget (and by example where both
    have outcomes on the same examples). Differences are oriented so that positive = better.
    Returns (estimate of the mean difference, identical predictions everywhere, paired seeds)."""
    m = g.merge(r, on=["seed", "steps", "batch_size"], suffixes=("", "_ref")).sort_values("seed")
    if m.empty:
        return seed_interval([]), False, 0
    sign = 1.0 if bool(g["higher_is_better"].iloc[0]) else -1.0
    per_example = (m["outcomes"].notna().all() and m["outcomes_ref"].notna().all()
                   and m["outcome_hash"].nunique() == 1 and (m["outcome_hash"] == m["outcome_hash_ref"]).all())
    if per_example:
        d = np.array([np.subtract(a.correct, b.correct) for a, b in zip(m["outcomes"], m["outcomes_ref"])],
                     dtype=np.float64) * sign
        same = all(a.pred is not None and a.pred == b.pred for a, b in zip(m["outcomes"], m["outcomes_ref"]))
        return crossed(d), same, len(m)
    return seed_interval(sign * (m["score"] - m["score_ref"])), False, len(m)


def compare_with_reference(trials: pd.DataFrame, reference: str = REFERENCE) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each method against `reference` per task, paired by seed and example at the same budget; the
    p-values of all these comparisons are Holm-corrected together. A 'win' ('loss') is a corrected
    two-sided test rejecting equality at 5% with the method better (worse); 'identical' is the same
    prediction on every example and seed; 'untested' is no variance or too few pairs."""
    detail_cols = ["family", "label", "task", "n_pairs", "diff", "diff_ci95", "diff_low", "diff_high", "ci_kind",
                   "p", "p_holm", "mdd80", "verdict"]
    ok = trials[trials["status"] == "ok"]
    ref = ok[ok["label"] == reference]
    rows, ests, same = [], [], []
    for (label, task), g in ok[ok["label"] != reference].groupby(["label", "task"], sort=True):
        r = ref[ref["task"] == task]
        if r.empty:
            continue
        e, identical, n_pairs = paired_estimate(g, r)
        ests.append(e)
        same.append(identical)
        rows.append({"family": g["family"].iloc[0], "label": label, "task": task, "n_pairs": n_pairs,
                     "diff": e.mean, "diff_ci95": e.ci95, "diff_low": e.low, "diff_high": e.high, "ci_kind": e.kind,
                     "p": e.p_value, "mdd80": e.mdd80})
    adjusted = holm([row["p"] for row in rows])
    for row, e, p_adj, identical in zip(rows, ests, adjusted, same):
        row["p_holm"] = p_adj
        row["verdict"] = verdict(e, p_adj, identical)
    detail = pd.DataFrame(rows, columns=detail_cols)
    srows = []
    for label, g in detail.groupby("label", sort=True):
        v = g["verdict"].value_counts()
        srows.append({"family": g["family"].iloc[0], "label": label, "tasks": len(g),
                      "wins": int(v.get("win", 0)), "ties": int(v.get("tie", 0)),
                      "losses": int(v.get("loss", 0)), "identical": int(v.get("identical", 0)),
                      "untested": int(v.get("untested", 0))})
    summ = pd.DataFrame(srows, columns=["family", "label", "tasks", "wins", "ties", "losses", "identical", "untested"])
    for df in (detail, summ):
        df["_f"] = df["family"].map(family_order)
    detail = detail.sort_values(["_f", "family", "label", "task"], kind="stable").drop(columns="_f")
    summ = summ.sort_values(["_f", "family", "label"], kind="stable").drop(columns="_f")
    return detail.reset_index(drop=True), summ.reset_index(drop=True)


ZERO_SHOT = "head"  # on a causal-LM task `head` trains nothing: its trials are the zero-shot model


def trivial_baselines(trials: pd.DataFrame, reference: str = REFERENCE) -> pd.DataFrame:
    """Per task: the majority-class baseline (the training split's most frequent label, scored on the
    eval examples from the recorded labels), the zero-shot model (`head` trials that trained 0 steps),
    the best of them, the reference's paired difference against that best baseline (Holm over tasks),
    and the minimum detectable difference at 80% power against the reference."""
    cols = ["task", "majority", "majority_ci95", "zero_shot", "zero_shot_ci95", "best", "best_score",
            "ref_diff", "ref_diff_ci95", "ref_p_holm", "ref_verdict", "mdd80"]
    ok = trials[trials["status"] == "ok"]
    rows, ests = [], []
    for task, g in ok.groupby("task", sort=True):
        row = {c: float("nan") for c in cols} | {"task": task, "best": "", "ref_verdict": "not measured"}
        cands: dict[str, float] = {}            # baseline -> mean score
        tables_: dict[str, np.ndarray] = {}     # baseline -> per-example table, where recorded
        labelled = g[g["outcomes"].notna() & g["majority_label"].notna()]
        labelled = labelled[[o.label is not None for o in labelled["outcomes"]]]
        if len(labelled) and labelled["outcome_hash"].nunique() == 1:
            o, k = labelled["outcomes"].iloc[0], int(labelled["majority_label"].iloc[0])
            tables_["majority"] = np.array([[float(y == k) for y in o.label]])
            e = crossed(tables_["majority"])
            row["majority"], row["majority_ci95"] = e.mean, e.ci95
            cands["majority"] = e.mean
        zs = g[(g["label"] == ZERO_SHOT) & (g["trained_steps"] == 0)]
        if len(zs):
            x, _ = outcome_table(zs)
            e = crossed(x) if x is not None else seed_interval(zs["score"])
            row["zero_shot"], row["zero_shot_ci95"] = e.mean, e.ci95
            cands["zero-shot"] = e.mean
            if x is not None:
                tables_["zero-shot"] = x[:1]  # zero-shot is the same model for every seed
        est = None
        if cands:
            best = max(cands, key=lambda k: (cands[k], k))
            row["best"], row["best_score"] = best, cands[best]
            x, _ = outcome_table(g[g["label"] == reference])
            if best in tables_ and x is not None and x.shape[1] == tables_[best].shape[1]:
                est = crossed(x - tables_[best])  # paired by example; the baseline is one fixed predictor
                row["ref_diff"], row["ref_diff_ci95"], row["mdd80"] = est.mean, est.ci95, est.mdd80
        rows.append(row)
        ests.append(est)
    adjusted = holm([e.p_value if e is not None else float("nan") for e in ests])
    for row, e, p in zip(rows, ests, adjusted):
        if e is not None:
            row["ref_p_holm"] = p
            row["ref_verdict"] = {"win": "beats it", "loss": "below it", "tie": "not distinguishable",
                                  "untested": "untested"}[verdict(e, p)]
    return pd.DataFrame(rows, columns=cols)


def below_baseline_reason(g: pd.DataFrame, flags: list[str]) -> str:
    """Why a row may sit at or below the trivial baseline, from what its trials recorded."""
    if (g["trained_steps"] == 0).all():
        return "nothing trained"
    if any(f.startswith("predicts one class") for f in flags):
        return "predicts one class"
    curves = [c for c in g["loss_curve"] if len(c) >= 2]
    if curves and all(c[-1] >= c[0] for c in curves):
        return "training loss did not fall"
    return "trained: its loss fell, its accuracy did not rise above the baseline"


def flag_rows(trials: pd.DataFrame, summary: pd.DataFrame, detail: pd.DataFrame, baselines: pd.DataFrame,
              notes: list[str], reference: str = REFERENCE) -> pd.DataFrame:
    """Flags on rows a reader must not take at face value: a trial that predicts one class, predictions
    identical to the reference's on every example and seed, a mean at or below the task's best trivial
    baseline. Each flag also becomes a note with its reason."""
    ok = trials[trials["status"] == "ok"]
    flags: dict[tuple, list[str]] = {}
    grouped: dict[tuple[str, str], list[str]] = {}   # (task, what) -> labels, one note each
    for (task, label), g in ok.groupby(["task", "label"], sort=True):
        one = [int(sd) for sd, o in zip(g["seed"], g["outcomes"]) if o is not None and o.one_class]
        if one:
            seeds = f"seed {', '.join(map(str, one))}"
            flags.setdefault((task, label), []).append(f"predicts one class ({seeds})")
            grouped.setdefault((task, "predicts one class on every example"), []).append(f"{label} ({seeds})")
    for _, r in detail[detail["verdict"] == "identical"].iterrows():
        flags.setdefault((r["task"], r["label"]), []).append(f"identical predictions to {reference}")
        grouped.setdefault((r["task"], f"the same prediction as {reference} on every example and seed"),
                           []).append(r["label"])
    best = {r["task"]: (r["best"], r["best_score"]) for _, r in baselines.iterrows() if r["best"]}
    for _, r in summary.iterrows():
        if r["task"] not in best or r["label"] == ZERO_SHOT or r["n_seeds"] == 0:
            continue
        name, score = best[r["task"]]
        higher = bool(r["higher_is_better"]) if r["higher_is_better"] is not None else True
        if (r["score"] <= score) if higher else (r["score"] >= score):
            why = below_baseline_reason(ok[(ok["task"] == r["task"]) & (ok["label"] == r["label"])],
                                        flags.get((r["task"], r["label"]), []))
            flags.setdefault((r["task"], r["label"]), []).append(f"at or below the {name} baseline ({why})")
            grouped.setdefault((r["task"], f"mean at or below the {name} baseline ({score:.4f})"),
                               []).append(f"{r['label']} ({why})")
    for (task, what), labels in sorted(grouped.items()):
        notes.append(f"Flag, {task}: {what}: {', '.join(sorted(labels))}.")
    summary = summary.copy()
    summary["flags"] = [("; ".join(flags.get((t, lab), []))) for t, lab in zip(summary["task"], summary["label"])]
    return summary


def iqm_rows(x: np.ndarray) -> np.ndarray:
    """The interquartile mean of each row (rliable's aggregate_iqm: scipy's 25% trimmed mean)."""
    from scipy.stats import trim_mean
    return trim_mean(x, 0.25, axis=1)


def prob_improvement_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """rliable's probability_of_improvement for each replicate: x, y of shape (reps, runs, tasks);
    per task P(X > Y) + P(X = Y) / 2 over all pairs of runs (the Mann-Whitney U statistic / (n m)),
    averaged over tasks."""
    gt = (x[:, :, None, :] > y[:, None, :, :]).mean(axis=(1, 2))
    eq = (x[:, :, None, :] == y[:, None, :, :]).mean(axis=(1, 2))
    return (gt + 0.5 * eq).mean(axis=1)


def aggregate(trials: pd.DataFrame, baselines: pd.DataFrame, reference: str = REFERENCE,
              reps: int = 2000) -> pd.DataFrame:
    """Across tasks (rliable, Agarwal et al. 2021, arXiv 2108.13264): the interquartile mean of scores
    normalised to the task's best trivial baseline ((score - baseline) / (1 - baseline); 0 = trivial,
    1 = perfect) and the probability of improvement over the reference, each with a 95% stratified
    bootstrap interval over seeds within tasks (fixed generator: the same records give the same bytes).
    Only methods with a seed on every task where the reference ran take part."""
    from rliable import metrics as rm
    cols = ["label", "family", "n_tasks", "iqm", "iqm_low", "iqm_high", "p_improve", "p_improve_low",
            "p_improve_high"]
    ok = trials[(trials["status"] == "ok") & (trials["metric"].isin(["accuracy", "exact_match"]))]
    base = {r["task"]: r["best_score"] for _, r in baselines.iterrows() if r["best"]}
    tasks = sorted(t for t in set(ok[ok["label"] == reference]["task"]) if t in base)
    if len(tasks) < 2:  # an aggregate "across tasks" of one task is that task's table
        return pd.DataFrame(columns=cols)

    def matrix(label: str) -> list[np.ndarray] | None:
        out = []
        for t in tasks:
            v = ok[(ok["label"] == label) & (ok["task"] == t)].sort_values("seed")["score"].to_numpy(dtype=float)
            if not len(v):
                return None
            out.append((v - base[t]) / (1.0 - base[t]))
        return out

    ref = matrix(reference)
    rows = []
    for label, g in ok.groupby("label", sort=True):
        m = matrix(label)
        if m is None:
            continue
        k = min(min(len(x) for x in m), min(len(x) for x in ref))
        x = np.stack([v[:k] for v in m], axis=1)   # (seeds, tasks)
        y = np.stack([v[:k] for v in ref], axis=1)
        # Point estimates from rliable; the bootstrap replicates below compute the same two statistics
        # vectorised over replicates (tests/test_report_stats.py checks they agree with rliable).
        iqm = float(rm.aggregate_iqm(x))
        p_imp = float(rm.probability_of_improvement(x, y)) if label != reference else float("nan")
        rng = np.random.default_rng(0)  # per method, so adding a method leaves the others' intervals as they were
        xb = np.take_along_axis(x[None], rng.integers(0, k, size=(reps, k, len(tasks))), axis=1)
        yb = np.take_along_axis(y[None], rng.integers(0, k, size=(reps, k, len(tasks))), axis=1)
        lo, hi = np.percentile(iqm_rows(xb.reshape(reps, -1)), [2.5, 97.5])
        plo, phi = ((float("nan"), float("nan")) if label == reference
                    else np.percentile(prob_improvement_rows(xb, yb), [2.5, 97.5]))
        rows.append({"label": label, "family": g["family"].iloc[0], "n_tasks": len(tasks), "iqm": iqm,
                     "iqm_low": float(lo), "iqm_high": float(hi), "p_improve": p_imp,
                     "p_improve_low": float(plo), "p_improve_high": float(phi)})
    return pd.DataFrame(rows, columns=cols).sort_values(["iqm", "label"], ascending=[False, True],
                                                         kind="stable").reset_index(drop=True)


def failures_frame(trials: pd.DataFrame) -> pd.DataFrame:
    f = trials[trials["status"] != "ok"][["task", "family", "label", "seed", "error"]]
    return f.sort_values(["task", "label", "seed"], kind="stable").reset_index(drop=True)


def busy_note(records: list[dict]) -> str | None:
    """Which trials ran on a busy machine: the 1-minute load average, read through the trial (the record's `load`,
    lorabench/runner/run.py), above the machine's cores on average. Their scores do not depend on it (a trial is
    deterministic); their times (train tokens/s, wall s) carry the contention."""
    timed = [r for r in records if isinstance(r.get("load"), dict) and r.get("status") == "ok"]
    busy = [r for r in timed if isinstance(r["load"].get("mean"), (int, float)) and isinstance(r["load"].get("cores"), int)
            and r["load"]["mean"] > r["load"]["cores"]]
    if not busy:
        return None
    worst = max(busy, key=lambda r: r["load"]["mean"])
    labels = sorted({f"{r.get('label')} on {r.get('task')}" for r in busy})
    shown = ", ".join(labels[:8]) + (f" and {len(labels) - 8} more" if len(labels) > 8 else "")
    return (f"{len(busy)} of {len(timed)} timed trial(s) ran while the machine's 1-minute load average exceeded its "
            f"cores (mean over the trial; at most {worst['load']['mean']:.1f} on {worst['load']['cores']} cores): "
            f"{shown}. Their times (train tokens/s, wall s) carry that contention and compare only with trials run "
            f"alike; their scores do not depend on it.")


def build(records: list[dict], notes: list[str] | None = None) -> Report:
    """`notes`: what the caller already knows the reader must see (lines the records reader skipped)."""
    notes = list(notes or [])
    all_trials = trials_frame(records, notes)  # every learning rate: the curves show the whole grid
    trials, lr_selection = select_learning_rates(all_trials, notes, suite_grids(records))
    summary = summarize(trials, notes)
    detail, summ = compare_with_reference(trials)
    if len(trials) and not (trials["label"] == REFERENCE).any():
        notes.append(f"No '{REFERENCE}' trials in these records: the paired comparison against {REFERENCE} is empty.")
    baselines = trivial_baselines(trials)
    if len(summary):
        summary = flag_rows(trials, summary, detail, baselines, notes)
    busy = busy_note(records)
    if busy:
        notes.append(busy)
    failures = failures_frame(trials)
    if len(failures):
        notes.append(f"{len(failures)} trial(s) failed; they are listed with their reason under 'Failed trials' "
                     f"and left out of means, ranks and comparisons.")
    return Report(trials=trials, summary=summary, average_rank=average_ranks(summary), paired_detail=detail,
                  all_trials=all_trials,
                  paired_summary=summ, failures=failures, notes=notes, records=records, baselines=baselines,
                  lr_selection=lr_selection, aggregate=aggregate(trials, baselines),
                  curves=curves_frame(all_trials, baselines))
