"""The clients scenario's table and plots (records with a `federated` block, lorabench/harness/clients.py).

Per task, partition and method: the final global score and the clients' personalised score with
95% intervals (seeds x eval examples where outcomes were recorded, else over seeds), megabytes
sent per round and in total, the aggregation error (mean over rounds; 0 is an exact
aggregation), the failed client rounds and the simulation's wall time. Plots per task: the global
score against rounds and against cumulative megabytes, one line per method and partition (mean
over seeds). The trials are the same records the leaderboard tables read (their label is
METHOD@PARTITION); this table adds what only the clients scenario measures.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd

from lorabench.report import stats

COLUMNS = ["task", "partition", "method", "label", "metric", "n_seeds", "score", "score_ci95", "ci_kind",
           "one_class_seeds", "personal_score", "personal_ci95", "personal_majority", "initial_score", "mb_per_round",
           "mb_total", "aggregation_error", "aggregation_error_max", "label_skew", "failed_client_rounds",
           "simulation_s"]


def federated_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and isinstance(r.get("federated"), dict)]


def _outcome_table(rs: list[dict]):
    from lorabench.tasks.base import Outcomes
    rows = []
    for r in rs:
        o = r.get("outcomes")
        if not o:
            return None
        rows.append(Outcomes.from_record(o).correct)
    if len({len(x) for x in rows}) != 1:
        return None
    return np.asarray(rows, dtype=float)


def _mean(xs):
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _one_class(r: dict) -> bool:
    """The global model predicted one class on every eval example (per-example outcomes with predictions)."""
    from lorabench.tasks.base import Outcomes
    return bool(r.get("outcomes")) and Outcomes.from_record(r["outcomes"]).one_class


def _clients_key(r: dict) -> tuple:
    f = r["federated"]
    return (r["task"], repr(sorted((r.get("task_options") or {}).items())), f["config"].get("partition"),
            f["config"].get("clients"), f["config"].get("test_fraction"), tuple(f.get("client_train_sizes") or ()))


def personal_majority(r: dict, shares: dict) -> float | None:
    """The trivial personalised score of the clients `r`'s personalised score is the mean over (the last round that
    reported one): the mean of their majority-class shares (partitions.client_majority). Records from before it was
    recorded take the shares from another record of the same clients (task, options, partition and sizes: the
    partition does not depend on the seed or the method)."""
    f = r["federated"]
    if f.get("personal_majority") is not None:
        return float(f["personal_majority"])
    share = f.get("client_majority") or shares.get(_clients_key(r))
    rounds = [x for x in f.get("rounds") or [] if x.get("personal_score") is not None]
    if not share or not rounds or not rounds[-1].get("clients"):
        return None
    base = [share[c] for c in rounds[-1]["clients"] if 0 <= c < len(share)]
    return sum(base) / len(base) if base and None not in base else None


def federated_frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    groups: dict[tuple, list[dict]] = {}
    shares = {_clients_key(r): r["federated"]["client_majority"] for r in federated_records(records)
              if r["federated"].get("client_majority")}
    for r in federated_records(records):
        part = r["federated"]["config"]["partition"]
        groups.setdefault((r["task"], part, r["method"], r["label"]), []).append(r)
    for (task, part, method, label), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        table = _outcome_table(rs) if rs[0]["metric"] == "accuracy" else None
        est = stats.crossed(table) if table is not None else stats.seed_interval([r["score"] for r in rs])
        pers = stats.seed_interval([r["federated"].get("personal_score") for r in rs])
        f = [r["federated"] for r in rs]
        better = "higher" if rs[0].get("higher_is_better", True) else "lower"
        rows.append({"task": task, "partition": part, "method": method, "label": label,
                     "metric": f"{rs[0]['metric']} ({better} is better)", "n_seeds": len(rs),
                     "score": est.mean, "score_ci95": est.ci95, "ci_kind": est.kind,
                     "one_class_seeds": sum(_one_class(r) for r in rs),
                     "personal_score": pers.mean, "personal_ci95": pers.ci95,
                     "personal_majority": _mean(personal_majority(r, shares) for r in rs),
                     "initial_score": _mean(x.get("initial_score") for x in f),
                     "mb_per_round": _mean(x["mb_per_round"] for x in f), "mb_total": _mean(x["mb_total"] for x in f),
                     "aggregation_error": _mean(x.get("aggregation_error_mean") for x in f),
                     "aggregation_error_max": max((x.get("aggregation_error_max") or 0.0) for x in f),
                     "label_skew": _mean(x.get("label_skew") for x in f),
                     "failed_client_rounds": sum(len(x.get("failures") or []) for x in f),
                     "simulation_s": _mean(x.get("simulation_seconds") for x in f)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def _pm(m, ci) -> str:
    if m is None or math.isnan(m):
        return "-"
    return f"{m:.3f}" + ("" if ci is None or math.isnan(ci) else f" ± {ci:.3f}")


def markdown(frame: pd.DataFrame, plots: list[str]) -> list[str]:
    """The report's "Federated" section: the table, then the plots (their file names under plots/)."""
    if not len(frame):
        return []
    out = ["## Federated (the clients scenario)", "",
           "Flower's simulation engine on Ray (lorabench/harness/clients.py): each row is a method on one partition "
           "of the training data over the clients. *global*: the aggregated model on the eval part after the last "
           "round; *personalised*: each client's model after its local steps on its own held-out examples, mean over "
           "the last round's clients, beside the same clients' trivial score (*client majority*: each predicting "
           "its own training majority class on its own held-out examples; under label skew it is high); "
           "*one class*: seeds whose global model predicted one class on every eval example; "
           "*aggregation error*: ||ΔW_agg − Σ w_i B_i A_i||_F / ||Σ w_i B_i A_i||_F over "
           "the adapted layers, mean over rounds (0 = exact); MB: tensors sent down and up; *label skew*: mean "
           "total-variation distance of the clients' label distributions from the pooled one.", "",
           "| task | partition | method | metric | seeds | global (95% CI) | one class | personalised (95% CI) | "
           "client majority | before training | MB / round | MB total | aggregation error (mean / max) | label skew | "
           "failed client rounds | simulation s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in frame.iterrows():
        out.append(f"| {r['task']} | {r['partition']} | {r['method']} | {r['metric']} | {r['n_seeds']} | "
                   f"{_pm(r['score'], r['score_ci95'])} | {r['one_class_seeds']} | "
                   f"{_pm(r['personal_score'], r['personal_ci95'])} | {_fmt(r['personal_majority'])} | "
                   f"{_fmt(r['initial_score'])} | {_fmt(r['mb_per_round'], 2)} | {_fmt(r['mb_total'], 2)} | "
                   f"{r['aggregation_error']:.2e} / {r['aggregation_error_max']:.2e} | {_fmt(r['label_skew'])} | "
                   f"{r['failed_client_rounds']} | {_fmt(r['simulation_s'], 0)} |")
    out.append("")
    out += [f"![{p[len('federated-'):-4]}](plots/{p})" for p in plots]
    return out + [""]


def plots(records: list[dict]) -> dict:
    """plots/federated-TASK-rounds.png and -mb.png: the global score against rounds and against cumulative MB."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lorabench.report.plots import Plot

    out: dict = {}
    by_task: dict[str, dict[str, list[dict]]] = {}
    for r in federated_records(records):
        by_task.setdefault(r["task"], {}).setdefault(r["label"], []).append(r)
    for task, labels in sorted(by_task.items()):
        metric = next(iter(labels.values()))[0]["metric"]
        for kind, xlabel in (("rounds", "round"), ("mb", "megabytes communicated (cumulative)")):
            fig = Figure(figsize=(7, 4.2), dpi=100)
            FigureCanvasAgg(fig)
            ax = fig.add_subplot(1, 1, 1)
            for label, rs in sorted(labels.items()):
                points: dict[int, list[tuple[float, float]]] = {}
                for r in rs:
                    f = r["federated"]
                    points.setdefault(0, []).append((0.0, f.get("initial_score", float("nan"))))
                    for rnd, score, mb in f["score_curve"]:
                        points.setdefault(int(rnd), []).append((float(mb), float(score)))
                rounds = sorted(points)
                ys = [_mean(s for _, s in points[k]) for k in rounds]
                xs = rounds if kind == "rounds" else [_mean(m for m, _ in points[k]) for k in rounds]
                ax.plot(xs, ys, marker="o", markersize=3, label=f"{label} ({len(rs)} seed(s))")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"global {metric}")
            ax.set_title(f"{task}: federated, global {metric} against {'rounds' if kind == 'rounds' else 'megabytes'}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", metadata={"Software": None})
            out[f"federated-{task}-{kind}.png"] = Plot(buf.getvalue(), f"{task}: federated ({kind})")
    return out
