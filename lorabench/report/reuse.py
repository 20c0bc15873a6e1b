"""The cross-task reuse protocol's table (records with a `reuse` block, lorabench/harness/reuse.py).

Per pool task and rule: zero-shot (the base model), the merged model alone (task arithmetic over the library), the
method's reuse (PERU-LoRA: the merged model plus the task's own rank-q update, one row per method label) and the
task's own full-rank adapter; the mean accuracy over seeds with its 95% interval over seeds x eval examples (each
record keeps every task's per-example outcomes); then the average over the pool per rule (per seed the mean over
the tasks, then the interval over seeds); and the parameters each task adds to the merged model.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lorabench.report import stats

COLUMNS = ["task", "rule", "n_seeds", "score", "score_ci95", "ci_kind", "task_params"]
BASELINES = ("zero-shot", "merged", "own")


def reuse_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and isinstance(r.get("reuse"), dict)]


def _bits(outcomes) -> list[int] | None:
    if outcomes is None:
        return None
    s = outcomes.get("correct") if isinstance(outcomes, dict) else outcomes
    return [int(c) for c in s] if isinstance(s, str) else None


def reuse_frame(records: list[dict]) -> pd.DataFrame:
    cells: dict = {}      # (task, rule) -> seed -> (score, outcomes)
    params: dict = {}
    for r in reuse_records(records):
        ru, seed = r["reuse"], int(r["seed"])
        label = r["label"].rsplit("@", 1)[0]
        rules = {"peru": f"{label} (q={ru['keep_rank']})", "merged": f"merged (λ={ru['merge_lambda']})",
                 "own": f"own adapter (r={ru['config']['library_rank']})", "zero-shot": "zero-shot"}
        params[rules["peru"]] = ru["task_params"]["peru"]
        params[rules["own"]] = ru["task_params"]["own"]
        params[rules["merged"]] = 0
        for task, e in ru["tasks"].items():
            for key, rule in rules.items():
                cells.setdefault((task, rule), {}).setdefault(seed, (float(e[key]["score"]), _bits(e[key]["outcomes"])))
    order = {"zero-shot": 0, "merged": 1, "own": 3}

    def rank(rule: str) -> tuple:
        return (order.get(rule.split(" ")[0], 2), rule)
    rows = []
    for (task, rule), per_seed in sorted(cells.items(), key=lambda kv: (kv[0][0], rank(kv[0][1]))):
        outs = [per_seed[s][1] for s in sorted(per_seed)]
        if all(o is not None for o in outs) and len({len(o) for o in outs}) == 1:
            est = stats.crossed(np.asarray(outs, dtype=float))
        else:
            est = stats.seed_interval([v[0] for v in per_seed.values()])
        rows.append({"task": task, "rule": rule, "n_seeds": len(per_seed), "score": est.mean, "score_ci95": est.ci95,
                     "ci_kind": est.kind, "task_params": params.get(rule)})
    tasks = sorted({k[0] for k in cells})
    for rule in sorted({k[1] for k in cells}, key=rank):
        have = [cells.get((t, rule), {}) for t in tasks]
        seeds = set.intersection(*[set(h) for h in have]) if have else set()
        if not seeds:
            continue
        est = stats.seed_interval([float(np.mean([h[s][0] for h in have])) for s in sorted(seeds)])
        rows.append({"task": f"average ({len(tasks)})", "rule": rule, "n_seeds": len(seeds), "score": est.mean,
                     "score_ci95": est.ci95, "ci_kind": est.kind, "task_params": params.get(rule)})
    return pd.DataFrame(rows, columns=COLUMNS)


def markdown(frame: pd.DataFrame) -> list[str]:
    """The report's "Reusing fine-tuned adapters" section."""
    if not len(frame):
        return []
    out = ["## Reusing fine-tuned adapters (cross-task reuse protocol)", "",
           "Every pool task scored with its own reuse of the library (lorabench/harness/reuse.py): *merged*, task "
           "arithmetic over all the library's adapters; the method (PERU-LoRA), the merged model plus the task's own "
           "update cut to rank q by SVD; *own adapter*, the task's full-rank LoRA (a fine-tuned model per task). "
           "Score: mean accuracy over seeds with its 95% interval (seeds x examples; the average: per seed the mean "
           "over the tasks, then over seeds). Parameters per task: what a task adds to the merged model.", "",
           "| task | rule | seeds | accuracy (95% CI) | parameters per task |", "|---|---|---|---|---|"]
    for _, r in frame.iterrows():
        ci = "" if math.isnan(r["score_ci95"]) else f" ± {r['score_ci95']:.3f}"
        p = "" if r["task_params"] is None or (isinstance(r["task_params"], float) and math.isnan(r["task_params"])) \
            else f"{int(r['task_params']):,}"
        out.append(f"| {r['task']} | {r['rule']} | {r['n_seeds']} | {r['score']:.3f}{ci} | {p} |")
    return out + [""]
