"""The report's continual-forgetting section (GS-LoRA's protocol, lorabench/harness/forgetting.py; docs/continual.md).

Per task (the classification task whose classes are forgotten), method label and forgetting task: the accuracy on
the classes forgotten before and after the task (Acc_f, lower is better), on the classes kept (Acc_r), the H-mean
of the paper (arXiv 2403.11530), 2 · Drop_f · Acc_r / (Drop_f + Acc_r), the accuracy on the classes forgotten in
earlier tasks, and the number of blocks whose LoRA group is zero; means over seeds with their 95% intervals.
"""
from __future__ import annotations

import math

import pandas as pd

from lorabench.report import stats

COLUMNS = ["task", "label", "method", "stage", "forget", "n_seeds", "h_mean", "h_mean_ci95", "acc_forget_before",
           "acc_forget", "acc_forget_ci95", "acc_retain_before", "acc_retain", "acc_retain_ci95",
           "acc_forgotten_earlier", "zero_groups", "groups"]


def forgetting_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and isinstance(r.get("forgetting"), dict)]


def _mean(xs):
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def forgetting_frame(records: list[dict]) -> pd.DataFrame:
    groups: dict[tuple, list[dict]] = {}
    for r in forgetting_records(records):
        groups.setdefault((r["forgetting"]["task"], r["label"], r["method"]), []).append(r)
    rows = []
    for (task, label, method), rs in sorted(groups.items()):
        for t in range(min(len(r["forgetting"]["stages"]) for r in rs)):
            st = [r["forgetting"]["stages"][t] for r in rs]
            h, f, k = (stats.seed_interval([s[key] for s in st]) for key in ("h_mean", "acc_forget", "acc_retain"))
            rows.append({"task": task, "label": label, "method": method, "stage": t + 1,
                         "forget": ",".join(map(str, st[0]["forget"])), "n_seeds": len(rs),
                         "h_mean": h.mean, "h_mean_ci95": h.ci95,
                         "acc_forget_before": _mean(s["acc_forget_before"] for s in st),
                         "acc_forget": f.mean, "acc_forget_ci95": f.ci95,
                         "acc_retain_before": _mean(s["acc_retain_before"] for s in st),
                         "acc_retain": k.mean, "acc_retain_ci95": k.ci95,
                         "acc_forgotten_earlier": _mean(s.get("acc_forgotten_earlier") for s in st),
                         "zero_groups": _mean(s.get("zero_groups") for s in st),
                         "groups": _mean(s.get("groups") for s in st)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _pm(m, ci) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    return f"{m:.3f}" + ("" if ci is None or (isinstance(ci, float) and math.isnan(ci)) else f" ± {ci:.3f}")


def markdown(frame: pd.DataFrame) -> list[str]:
    if not len(frame):
        return []
    out = ["## Continual forgetting (GS-LoRA's protocol)", "",
           "A model fully fine-tuned on every class of the task forgets the listed classes task after task, keeping the "
           "others (lorabench/harness/forgetting.py). *Acc_f*: accuracy on the classes forgotten by that task, before "
           "and after it (lower is better); *Acc_r*: on the classes kept; *H-mean*: 2 · Drop_f · Acc_r / (Drop_f + "
           "Acc_r), Drop_f the fall of Acc_f (arXiv 2403.11530); *earlier*: accuracy on the classes forgotten by earlier "
           "tasks; *zero groups*: blocks whose LoRA group is exactly zero after the task. Means over seeds, 95% "
           "intervals over seeds.", "",
           "| task | label | forgetting task | forget | seeds | H-mean | Acc_f before → after | Acc_r before → after | "
           "earlier | zero groups |", "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in frame.iterrows():
        out.append(f"| {r['task']} | {r['label']} | {r['stage']} | {r['forget']} | {r['n_seeds']} | "
                   f"{_pm(r['h_mean'], r['h_mean_ci95'])} | {r['acc_forget_before']:.3f} → "
                   f"{_pm(r['acc_forget'], r['acc_forget_ci95'])} | {r['acc_retain_before']:.3f} → "
                   f"{_pm(r['acc_retain'], r['acc_retain_ci95'])} | {_pm(r['acc_forgotten_earlier'], None)} | "
                   f"{r['zero_groups']:.1f} / {r['groups']:.0f} |")
    return out + [""]
