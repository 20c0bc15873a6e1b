"""The cross-task scenario's tables (records with a `cross_task` block, lorabench/harness/cross_task.py).

Composition table: per held-out task, one row per rule: the baselines every record carries for its seed
(zero-shot, k-shot in-context learning, a LoRA trained on the k shots, the best single library adapter by
k-shot loss) and each composition method (uniform averaging
included); the mean score over seeds with its 95% interval (seeds x eval examples where outcomes were
recorded, else over seeds), the best and the spread (standard deviation) over seeds, and the k-shot tokens
the rule read to compose (loss evaluations x tokens of the k shots). The average row averages each seed's
scores over the held-out tasks first, then takes the interval over seeds.

Merge table (uniform-average records), per held-out task: each weight-space merge of its candidates at equal weights against
the exact Σ (1/N) s B_i A_i, the relative Frobenius error over all layers (0 = exact).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lorabench.report import stats

COLUMNS = ["held_out", "rule", "n_seeds", "score", "score_ci95", "ci_kind", "best", "spread", "compose_tokens"]
BASELINES = ("zero-shot", "icl", "kshot-lora", "best-single", "multitask-lora")


def cross_task_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and isinstance(r.get("cross_task"), dict)]


def _outcomes(block: dict):
    from lorabench.tasks.base import Outcomes
    o = block.get("outcomes")
    return None if not o else Outcomes.from_record(o).correct


def _rows(records: list[dict]) -> dict[tuple[str, str], dict[int, tuple[float, list | None, float]]]:
    """(held-out task, rule) -> seed -> (score, per-example outcomes or None, compose tokens)."""
    out: dict = {}
    for r in cross_task_records(records):
        ct, seed, task = r["cross_task"], int(r["seed"]), r["task"]
        out.setdefault((task, r["label"]), {})[seed] = (float(r["score"]), _outcomes(r), float(ct.get("compose_tokens", 0)))
        for name, m in (ct.get("merges") or {}).items():   # peft merges of the same candidates (uniform weights)
            out.setdefault((task, f"merge:{name}"), {})[seed] = (float(m["score"]), _outcomes(m), 0.0)
        for name in BASELINES:   # the same for every method at a seed: the first record's is kept
            b = (ct.get("baselines") or {}).get(name)
            if b is not None:
                tokens = {"zero-shot": 0.0, "icl": float(ct.get("kshot_tokens", 0)),   # read before every prompt
                          "kshot-lora": float(b.get("steps", 0)) * float(ct.get("kshot_tokens", 0)),
                          "multitask-lora": 0.0,   # trained on the held-out task's whole training split instead
                          }.get(name, float(ct.get("kshot_tokens", 0)) * len(ct["candidates"]))
                out.setdefault((task, name), {}).setdefault(seed, (float(b["score"]), _outcomes(b), tokens))
    return out


def _estimate(per_seed: dict[int, tuple]) -> stats.Estimate:
    seeds = sorted(per_seed)
    outcomes = [per_seed[s][1] for s in seeds]
    if all(o is not None for o in outcomes) and len({len(o) for o in outcomes}) == 1:
        return stats.crossed(np.asarray(outcomes, dtype=float))
    return stats.seed_interval([per_seed[s][0] for s in seeds])


def cross_task_frame(records: list[dict]) -> pd.DataFrame:
    rows_by_key = _rows(records)
    order = {name: i for i, name in enumerate(BASELINES)}
    rows = []
    for (task, rule), per_seed in sorted(rows_by_key.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9), kv[0][1])):
        scores = [v[0] for v in per_seed.values()]
        est = _estimate(per_seed)
        rows.append({"held_out": task, "rule": rule, "n_seeds": len(per_seed), "score": est.mean,
                     "score_ci95": est.ci95, "ci_kind": est.kind, "best": max(scores),
                     "spread": float(np.std(scores, ddof=1)) if len(scores) > 1 else float("nan"),
                     "compose_tokens": float(np.mean([v[2] for v in per_seed.values()]))})
    # the average over held-out tasks: per seed, the mean over the tasks that rule ran on at that seed
    tasks = sorted({t for t, _ in rows_by_key})
    for rule in sorted({r for _, r in rows_by_key}, key=lambda r: (order.get(r, 9), r)):
        seeds = set.intersection(*[set(rows_by_key.get((t, rule), {})) for t in tasks])
        if len(tasks) < 2 or not seeds:
            continue
        per_seed = [float(np.mean([rows_by_key[(t, rule)][s][0] for t in tasks])) for s in sorted(seeds)]
        est = stats.seed_interval(per_seed)
        rows.append({"held_out": f"average ({len(tasks)} tasks)", "rule": rule, "n_seeds": len(seeds),
                     "score": est.mean, "score_ci95": est.ci95, "ci_kind": est.kind, "best": max(per_seed),
                     "spread": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan"),
                     "compose_tokens": float(np.mean([rows_by_key[(t, rule)][s][2] for t in tasks for s in seeds]))})
    return pd.DataFrame(rows, columns=COLUMNS)


def merge_frame(records: list[dict]) -> pd.DataFrame:
    """Per held-out task (its candidates are the library adapters merged) and merge: the error over trials."""
    errors: dict[tuple[str, str], list[float]] = {}
    for r in cross_task_records(records):
        for k, v in (r["cross_task"].get("merge_errors") or {}).items():
            errors.setdefault((r["task"], k), []).append(float(v))
    return pd.DataFrame([{"held_out": t, "merge": k, "n": len(v), "error_mean": float(np.mean(v)),
                          "error_max": float(np.max(v))} for (t, k), v in sorted(errors.items())],
                        columns=["held_out", "merge", "n", "error_mean", "error_max"])


def _f(v, digits=3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown(frame: pd.DataFrame, merges: pd.DataFrame) -> list[str]:
    """The report's "Cross-task composition" section."""
    if not len(frame):
        return []
    out = ["## Cross-task composition (leave one task out)", "",
           "Each held-out task's adapter is left out of the library; the rules compose the other tasks' adapters "
           "using k examples of the held-out task (lorabench/harness/cross_task.py). *zero-shot*: the base model; "
           "*icl*: the base model with the k shots before every eval prompt (in-context learning; its k-shot tokens "
           "are read again for every example); *kshot-lora*: a fresh LoRA trained on the k shots alone; "
           "*best-single*: the candidate adapter with the lowest k-shot loss; *multitask-lora*: one LoRA trained on "
           "every pool task's training data, the held-out task's included (the upper reference: composing sees only "
           "k examples of it); the others are registered methods of "
           "the cross-task family; *merge:peft-T*: peft's add_weighted_adapter of type T over the same candidates at "
           "equal weights (beside uniform-average, the exact average). Score: mean over seeds (the seed draws the k shots and seeds the optimiser) with "
           "its 95% interval; *best* and *spread* (standard deviation) over seeds; *k-shot tokens*: tokens of the "
           "held-out task the rule read to compose (loss evaluations x k-shot tokens).", "",
           "| held-out task | rule | seeds | score (95% CI) | best | spread | k-shot tokens |",
           "|---|---|---|---|---|---|---|"]
    for _, r in frame.iterrows():
        ci = "" if math.isnan(r["score_ci95"]) else f" ± {r['score_ci95']:.3f}"
        out.append(f"| {r['held_out']} | {r['rule']} | {r['n_seeds']} | {_f(r['score'])}{ci} | {_f(r['best'])} | "
                   f"{_f(r['spread'])} | {r['compose_tokens']:.0f} |")
    if len(merges):
        out += ["", "Merging the candidates at equal weights: each merge's relative error ‖ΔW_merge − ΔW‖_F / ‖ΔW‖_F "
                "against the exact ΔW = Σ (1/N) s B_i A_i, over all adapted layers (0 = exact up to rounding; "
                "lorabench/methods/cross_task/merging.py). peft's factor-wise types (linear, ties, dare_*, "
                "magnitude_prune) sum the factors, so their product has cross terms B_i A_j.", "",
                "| held-out task (its candidates merged) | merge | trials | error (mean) | error (max) |",
                "|---|---|---|---|---|"]
        for _, r in merges.iterrows():
            out.append(f"| {r['held_out']} | {r['merge']} | {r['n']} | {r['error_mean']:.2e} | {r['error_max']:.2e} |")
    return out + [""]
