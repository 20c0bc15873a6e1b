"""The sequence scenario's tables and heat maps (records with a `continual` block, lorabench/harness/sequence.py).

Per order and method (its suite label): ACC, BWT and FWT (definitions in docs/continual.md) with 95%
intervals that carry both the training seeds' and the evaluation sample's variance (the crossed
seeds x examples model of `stats.crossed`, on the per-example outcomes each record keeps for every
entry of R), the validation ACC a penalty weight is chosen on, and the newest adapter's norm after the
last stage. Each method is compared with `seq-lora` on the same order by the paired difference (same
seed, same example) of ACC and of BWT, with its interval. Where one method runs under several labels
that differ in one numeric option (O-LoRA's lambda), a sweep table shows the validation ACC, the test
ACC and the adapter norm against the option, and which value the validation score chooses. Heat maps:
plots/continual-ORDER.png, R averaged over seeds, one panel per method; plots/continual-sweep-ORDER-METHOD.png,
validation and test ACC and the newest adapter's norm against the swept option.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd

from lorabench.report import display as D
from lorabench.report import stats

REFERENCE = "seq-lora"
COLUMNS = ["order", "label", "method", "n_seeds", "n_tasks", "acc", "acc_ci95", "bwt", "bwt_ci95", "fwt", "fwt_ci95",
           "ci_kind", "val_acc", "adapter_norm_last", "adapter_norm_min", "d_acc", "d_acc_ci95", "d_bwt", "d_bwt_ci95"]


def continual_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and isinstance(r.get("continual"), dict)]


def _bits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8).astype(np.float64) - 48.0


def example_terms(c: dict, measure: str) -> np.ndarray | None:
    """Per-example terms whose mean is the record's ACC, BWT or FWT: each task j's examples weighted by
    N / (k n_j), where k tasks enter the measure and N is their examples, so that every task counts equally
    whatever its eval size (equal sizes: weight 1)."""
    out, T = c["outcomes"], len(c["tasks"])
    if measure == "acc":
        parts = [_bits(out[T - 1][j]) for j in range(T)]
    elif measure == "bwt":
        parts = [_bits(out[T - 1][j]) - _bits(out[j][j]) for j in range(T - 1)]
    else:
        if any(out[j - 1][j] is None for j in range(1, T)):
            return None
        zero = c["zero_shot_outcomes"]
        parts = [_bits(out[j - 1][j]) - _bits(zero[j]) for j in range(1, T)]
    if not parts:
        return None
    n = sum(len(p) for p in parts)
    return np.concatenate([p * (n / (len(parts) * len(p))) for p in parts])


def _table(rs: list[dict], measure: str) -> np.ndarray | None:
    rows = [example_terms(r["continual"], measure) for r in rs]
    if any(x is None for x in rows) or len({len(x) for x in rows}) != 1:
        return None
    return np.vstack(rows)


def _mean(xs) -> float:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _groups(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in continual_records(records):
        groups.setdefault((r["continual"]["order"], r["label"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in sorted(groups.items())}


def continual_frame(records: list[dict]) -> pd.DataFrame:
    groups = _groups(records)
    ref_label = {order: label for (order, label), rs in groups.items() if rs[0]["method"] == REFERENCE}
    rows = []
    for (order, label), rs in groups.items():
        est = {}
        for m in ("acc", "bwt", "fwt"):
            table = _table(rs, m)
            est[m] = stats.crossed(table) if table is not None else stats.seed_interval(
                [r["continual"].get(m) for r in rs])
        norms = [r["continual"]["adapter_norms"] for r in rs]
        row = {"order": order, "label": label, "method": rs[0]["method"], "n_seeds": len(rs),
               "n_tasks": len(rs[0]["continual"]["tasks"]),
               "acc": est["acc"].mean, "acc_ci95": est["acc"].ci95, "bwt": est["bwt"].mean, "bwt_ci95": est["bwt"].ci95,
               "fwt": est["fwt"].mean, "fwt_ci95": est["fwt"].ci95, "ci_kind": est["acc"].kind,
               "val_acc": _mean(r["continual"].get("val_acc") for r in rs),
               "adapter_norm_last": _mean(n[-1] for n in norms), "adapter_norm_min": _mean(min(n) for n in norms),
               "d_acc": float("nan"), "d_acc_ci95": float("nan"), "d_bwt": float("nan"), "d_bwt_ci95": float("nan")}
        ref = ref_label.get(order)
        if ref is not None and ref != label:
            by_seed = {r["seed"]: r for r in groups[(order, ref)]}
            pairs = [(r, by_seed[r["seed"]]) for r in rs if r["seed"] in by_seed]
            for m in ("acc", "bwt"):
                a = _table([p for p, _ in pairs], m) if pairs else None
                b = _table([q for _, q in pairs], m) if pairs else None
                if a is not None and b is not None and a.shape == b.shape:
                    d = stats.crossed(a - b)  # paired by seed and by example
                    row[f"d_{m}"], row[f"d_{m}_ci95"] = d.mean, d.ci95
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def _option_defaults(method: str) -> dict:
    """The registered method's option defaults (empty for a name the registry does not know)."""
    from lorabench.methods import METHODS, get_method
    return get_method(method)().config_dict() if method in METHODS.names() else {}


def sweeps(records: list[dict]) -> pd.DataFrame:
    """Methods run under several labels that differ in exactly one numeric option: the option's value against
    the validation ACC, test ACC, BWT and the newest adapter's norm, per order; `chosen` marks the value with
    the best validation ACC (ties: the smaller value). A label that leaves the option out ran at the method's
    default, which is what its row shows (I-LoRA's `i-lora` beside `i-lora-e0.9`)."""
    frame = continual_frame(records)
    groups = _groups(records)
    rows = []
    for (order, method), g in frame.groupby(["order", "method"], sort=True):
        if len(g) < 2:
            continue
        defaults = _option_defaults(method)
        opts = {lab: {**defaults, **(groups[(order, lab)][0].get("method_options") or {})} for lab in g["label"]}
        keys = set().union(*opts.values())
        varying = [k for k in sorted(keys) if len({repr(o.get(k)) for o in opts.values()}) > 1]
        if len(varying) != 1 or not all(isinstance(o.get(varying[0]), (int, float)) for o in opts.values()):
            continue
        key = varying[0]
        sub = g.assign(value=[float(opts[lab][key]) for lab in g["label"]]).sort_values("value")
        best = sub.sort_values(["val_acc", "value"], ascending=[False, True]).iloc[0]["label"] \
            if sub["val_acc"].notna().any() else None
        for _, r in sub.iterrows():
            rows.append({"order": order, "method": method, "option": key, "value": r["value"], "label": r["label"],
                         "val_acc": r["val_acc"], "acc": r["acc"], "bwt": r["bwt"],
                         "adapter_norm_last": r["adapter_norm_last"], "adapter_norm_min": r["adapter_norm_min"],
                         "chosen": r["label"] == best})
    return pd.DataFrame(rows, columns=["order", "method", "option", "value", "label", "val_acc", "acc", "bwt",
                                       "adapter_norm_last", "adapter_norm_min", "chosen"])


def display_tables(records: list[dict]) -> list[D.Table]:
    frame = continual_frame(records)
    if not len(frame):
        return []
    main = D.Table("continual", ["order", "method", "seeds", "tasks", "ACC (95% CI)", "BWT (95% CI)", "FWT (95% CI)",
                                 "interval over", "validation ACC", "adapter norm (last / min)",
                                 f"ΔACC vs {REFERENCE} (paired)", f"ΔBWT vs {REFERENCE} (paired)"], [], "continual")
    for _, r in frame.iterrows():
        norm = "–" if D.isnan(r["adapter_norm_last"]) else f"{r['adapter_norm_last']:.3f} / {r['adapter_norm_min']:.3f}"
        main.rows.append([(str(r["order"]), str(r["order"])), (str(r["label"]), str(r["label"])),
                          D.count(r["n_seeds"]), D.count(r["n_tasks"]), D.pm(r["acc"], r["acc_ci95"], 3),
                          D.pm(r["bwt"], r["bwt_ci95"], 3), D.pm(r["fwt"], r["fwt_ci95"], 3),
                          (str(r["ci_kind"]), str(r["ci_kind"])), D.num(r["val_acc"], 3),
                          (norm, float(r["adapter_norm_last"])), D.pm(r["d_acc"], r["d_acc_ci95"], 3),
                          D.pm(r["d_bwt"], r["d_bwt_ci95"], 3)])
    out = [main]
    sw = sweeps(records)
    if len(sw):
        t = D.Table("continual sweeps", ["order", "method", "option", "value", "label", "validation ACC", "ACC", "BWT",
                                         "adapter norm (last)", "adapter norm (min)", "chosen on validation"], [],
                    "continual-sweeps")
        for _, r in sw.iterrows():
            t.rows.append([(str(r["order"]), str(r["order"])), (str(r["method"]), str(r["method"])),
                           (str(r["option"]), str(r["option"])), D.num(r["value"], 3), (str(r["label"]), str(r["label"])),
                           D.num(r["val_acc"], 3), D.num(r["acc"], 3), D.num(r["bwt"], 3),
                           D.num(r["adapter_norm_last"], 3), D.num(r["adapter_norm_min"], 3),
                           ("yes" if r["chosen"] else "", "yes" if r["chosen"] else "")])
        out.append(t)
    return out


INTRO = ("The sequence scenario (lorabench/harness/sequence.py; definitions in docs/continual.md): each row trains "
         "one model on the order's tasks one after another. R[i][j] is the accuracy on task j after stage i; "
         "*ACC* = mean_j R[T-1][j]; *BWT* = mean_{j<T-1} (R[T-1][j] − R[j][j]) (negative: forgetting); *FWT* = "
         "mean_{j>0} (R[j-1][j] − b_j), b_j the base model's accuracy before training. Intervals carry the seeds' and "
         "the eval examples' variance; the Δ columns are paired (same seed, same example) differences from "
         f"`{REFERENCE}` on the same order. *adapter norm*: ||ΔW||_F of the newest adapter after the last stage "
         "(and its smallest over stages): a penalty that shrinks the new adapter to nothing shows here.")


def what_ran(records: list[dict]) -> str:
    """Which suites, orders and seeds the continual records cover, and their overrides (the leaderboard's
    coverage lines read the per-task trials only)."""
    recs = continual_records(records)
    parts = []
    for suite in sorted({(str(r.get("suite")), str(r.get("suite_version"))) for r in recs}):
        rs = [r for r in recs if (str(r.get("suite")), str(r.get("suite_version"))) == suite]
        over = sorted({o for r in rs for o in (r.get("overrides") or []) if isinstance(o, str)})
        parts.append(f"suite {suite[0]} v{suite[1]}: {len(rs)} trial(s), orders "
                     f"{', '.join(sorted({r['continual']['order'] for r in rs}))}, seeds "
                     f"{', '.join(map(str, sorted({r['seed'] for r in rs})))}, methods "
                     f"{', '.join(sorted({r['label'].split('@')[0] for r in rs}))}"
                     + (f", run with {' '.join(over)}" if over else ""))
    return "; ".join(parts) + "." if parts else "none."


def markdown(records: list[dict], plots: list[str]) -> list[str]:
    """The report's "Continual learning" section: the tables, then the heat maps (file names under plots/)."""
    from lorabench.report.markdown import md_table
    tables = display_tables(records)
    if not tables:
        return []
    out = ["## Continual learning (the sequence scenario)", "", INTRO, "", f"Records: {what_ran(records)}", "",
           md_table(tables[0]), ""]
    if len(tables) > 1:
        out += ["Penalty weights swept (one label per value): the value with the best validation ACC is the one "
                "to report; the adapter norm shows whether the penalty shrank the new adapter.", "",
                md_table(tables[1]), ""]
    out += [f"![{p[len('continual-'):-4]}](plots/{p})" for p in plots]
    return out + [""]


def plots(records: list[dict]) -> dict:
    """plots/continual-ORDER.png: R averaged over seeds as a heat map, one panel per method (label)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lorabench.report.plots import Plot

    out: dict = {}
    by_order: dict[str, dict[str, list[dict]]] = {}
    for (order, label), rs in _groups(records).items():
        by_order.setdefault(order, {})[label] = rs
    for order, labels in sorted(by_order.items()):
        n = len(labels)
        cols = min(4, n)
        rows = (n + cols - 1) // cols
        tasks = next(iter(labels.values()))[0]["continual"]["tasks"]
        T = len(tasks)
        size = 0.45 * T + 1.6
        fig = Figure(figsize=(cols * size, rows * size + 0.6), dpi=100)
        FigureCanvasAgg(fig)
        for k, (label, rs) in enumerate(sorted(labels.items())):
            ax = fig.add_subplot(rows, cols, k + 1)
            R = np.array([[np.nan if x is None else x for x in row] for row in rs[0]["continual"]["R"]], dtype=float)
            for r in rs[1:]:
                R = R + np.array([[np.nan if x is None else x for x in row] for row in r["continual"]["R"]], dtype=float)
            R = R / len(rs)
            ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
            if T <= 6:
                for i in range(T):
                    for j in range(T):
                        if not np.isnan(R[i, j]):
                            ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                    color="white" if R[i, j] < 0.6 else "black")
            ax.set_title(f"{label} ({len(rs)} seed(s))", fontsize=8)
            ax.set_xticks(range(T))
            ax.set_xticklabels(tasks, rotation=60, ha="right", fontsize=6)
            ax.set_yticks(range(T))
            ax.set_yticklabels([f"after {t}" for t in tasks], fontsize=6)
        fig.suptitle(f"{order}: R[i][j], accuracy on task j (column) after training on tasks 0..i (row)", fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
        out[f"continual-{order}.png"] = Plot(buf.getvalue(), f"{order}: continual accuracy matrix R")
    sw = sweeps(records)
    for (order, method), g in sw.groupby(["order", "method"], sort=True):
        fig = Figure(figsize=(6.5, 3.8), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(g["value"], g["val_acc"], marker="o", label="validation ACC")
        ax.plot(g["value"], g["acc"], marker="s", label="test ACC")
        ax.set_xscale("log" if (g["value"] > 0).all() else "linear")
        ax.set_xlabel(str(g["option"].iloc[0]))
        ax.set_ylabel("accuracy (mean over tasks)")
        ax2 = ax.twinx()
        ax2.plot(g["value"], g["adapter_norm_last"], color="gray", linestyle="--", marker="^",
                 label="newest adapter norm")
        ax2.set_ylabel("||ΔW||_F of the newest adapter")
        ax2.set_ylim(bottom=0)
        chosen = g[g["chosen"]]
        if len(chosen):
            ax.axvline(float(chosen["value"].iloc[0]), color="black", alpha=0.3)
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower left")
        ax.set_title(f"{order}: {method}, accuracy and adapter norm against {g['option'].iloc[0]}", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
        out[f"continual-sweep-{order}-{method}.png"] = Plot(buf.getvalue(), f"{order}: {method} sweep")
    return out
