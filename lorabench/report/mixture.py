"""The cross-task protocol (b)'s table (records with a `mixture` block, lorabench/harness/mixture.py).

Per split, task and method (the multi-task LoRA reference is a method row; zero-shot is every record's baseline):
the mean accuracy over seeds with its 95% interval over seeds x eval examples (each record keeps every task's
per-example outcomes); then, per split and method, the average over its training tasks and over its held-out
tasks (per seed the mean over the tasks, then the interval over seeds).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lorabench.report import stats

COLUMNS = ["split", "task", "held_out", "method", "n_seeds", "score", "score_ci95", "ci_kind"]


def mixture_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and isinstance(r.get("mixture"), dict)]


def _bits(s: str) -> list[int]:
    return [int(c) for c in s]


def mixture_frame(records: list[dict]) -> pd.DataFrame:
    cells: dict = {}      # (split, task, method) -> seed -> (score, outcomes)
    held: dict = {}
    for r in mixture_records(records):
        m, seed = r["mixture"], int(r["seed"])
        label = r["label"].rsplit("@", 1)[0]
        for task, t in m["tasks"].items():
            cells.setdefault((m["split"], task, label), {})[seed] = (float(t["score"]), _bits(t["outcomes"]))
            held[(m["split"], task)] = bool(t["held_out"])
        for task, z in (m.get("zero_shot") or {}).items():
            cells.setdefault((m["split"], task, "zero-shot"), {}).setdefault(seed, (float(z["score"]), _bits(z["outcomes"])))
    rows = []
    for (split, task, method), per_seed in sorted(cells.items(), key=lambda kv: (kv[0][0], held[kv[0][:2]], kv[0][1],
                                                                             kv[0][2] != "zero-shot", kv[0][2])):
        outs = [per_seed[s][1] for s in sorted(per_seed)]
        est = stats.crossed(np.asarray(outs, dtype=float)) if len({len(o) for o in outs}) == 1 else \
            stats.seed_interval([v[0] for v in per_seed.values()])
        rows.append({"split": split, "task": task, "held_out": held[(split, task)], "method": method,
                     "n_seeds": len(per_seed), "score": est.mean, "score_ci95": est.ci95, "ci_kind": est.kind})
    for split in sorted({k[0] for k in cells}):
        for is_held in (False, True):
            tasks = sorted({t for (sp, t), h in held.items() if sp == split and h == is_held})
            for method in sorted({k[2] for k in cells if k[0] == split}, key=lambda x: (x != "zero-shot", x)):
                have = [cells.get((split, t, method), {}) for t in tasks]
                seeds = set.intersection(*[set(h) for h in have]) if tasks else set()
                if not seeds:
                    continue
                est = stats.seed_interval([float(np.mean([h[s][0] for h in have])) for s in sorted(seeds)])
                rows.append({"split": split, "task": f"average ({'held-out' if is_held else 'training'}, {len(tasks)})",
                             "held_out": is_held, "method": method, "n_seeds": len(seeds), "score": est.mean,
                             "score_ci95": est.ci95, "ci_kind": est.kind})
    return pd.DataFrame(rows, columns=COLUMNS)


def markdown(frame: pd.DataFrame) -> list[str]:
    """The report's "Mixtures of LoRA experts" section."""
    if not len(frame):
        return []
    out = ["## Mixtures of LoRA experts (cross-task protocol (b))", "",
           "Each method trains on round-robin batches of the split's training tasks, then every training and held-out "
           "task is scored (lorabench/harness/mixture.py); *zero-shot*: the base model; the multi-task LoRA reference "
           "is a method row. Score: mean accuracy over seeds with its 95% interval (seeds x examples; averages: per "
           "seed the mean over the tasks, then over seeds).", "",
           "| split | task | held out | method | seeds | accuracy (95% CI) |", "|---|---|---|---|---|---|"]
    for _, r in frame.iterrows():
        ci = "" if math.isnan(r["score_ci95"]) else f" ± {r['score_ci95']:.3f}"
        out.append(f"| {r['split']} | {r['task']} | {'yes' if r['held_out'] else ''} | {r['method']} | {r['n_seeds']} | "
                   f"{r['score']:.3f}{ci} |")
    return out + [""]
