"""Human-readable tables (strings) built from the report's frames; shared by Markdown and HTML.

Each display table is a list of columns and rows of (text, sort key) cells, so the HTML page can
sort numerically on the exact value while showing the rounded text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from lorabench.report import findings as findings_mod
from lorabench.report.tables import Report, family_order, family_title


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[tuple[str, object]]]   # (display text, sort key: float or str)
    anchor: str = ""


def isnan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def num(v, digits: int = 4) -> tuple[str, object]:
    return ("–", float("nan")) if isnan(v) else (f"{v:.{digits}f}", float(v))


def pm(mean, ci, digits: int = 4) -> tuple[str, object]:
    if isnan(mean):
        return "–", float("nan")
    return (f"{mean:.{digits}f}" + ("" if isnan(ci) else f" ± {ci:.{digits}f}")), float(mean)


def count(v) -> tuple[str, object]:
    if isnan(v):
        return "–", float("nan")
    v = float(v)
    for unit, div in (("M", 1e6), ("K", 1e3)):
        if v >= div:
            return f"{v / div:.3g}{unit}", v
    return f"{v:.0f}", v


def size(v) -> tuple[str, object]:
    if isnan(v):
        return "–", float("nan")
    v = float(v)
    for unit, div in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if v >= div:
            return f"{v / div:.1f} {unit}", v
    return f"{v:.0f} B", v


def text(v) -> tuple[str, object]:
    s = "" if isnan(v) else str(v)
    return s, s


def one_line(s: str, limit: int = 240) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def pval(v) -> tuple[str, object]:
    if isnan(v):
        return "–", float("nan")
    return (f"{v:.2g}" if v < 0.001 else f"{v:.3f}"), float(v)


def leaderboard_tables(rep: Report) -> list[Table]:
    out = []
    if "task" not in rep.summary.columns:  # no single-task trials (a report of scenario records alone)
        return out
    for task, g in rep.summary.groupby("task", sort=True):
        higher = bool(g["higher_is_better"].iloc[0]) if g["higher_is_better"].iloc[0] is not None else True
        metric = f"{g['metric'].iloc[0]} {'↑' if higher else '↓'} (mean ± 95% interval)"
        rows = []
        for _, r in g.iterrows():
            ci_mem = "" if isnan(r["peak_rss_mb_ci95"]) else f" ± {r['peak_rss_mb_ci95']:.0f}"
            ci_tps = "" if isnan(r["train_tokens_per_s_ci95"]) else f" ± {r['train_tokens_per_s_ci95']:,.0f}"
            rows.append([
                num(r["rank"], 0) if not isnan(r["rank"]) else ("failed", float("inf")),
                text(r["label"]), text(r["family"]), pm(r["score"], r["score_ci95"]), text(r.get("ci_kind", "")),
                (f"{r['n_seeds']}" + (f" ({r['n_failed']} failed)" if r["n_failed"] else ""), float(r["n_seeds"])),
                ("–", float("nan")) if isnan(r.get("lr")) else (f"{r['lr']:.3g}", float(r["lr"])),
                ("–", float("nan")) if isnan(r["peak_rss_mb"]) else (f"{r['peak_rss_mb']:.0f}{ci_mem}", float(r["peak_rss_mb"])),
                ("–", float("nan")) if isnan(r["train_tokens_per_s"]) else (f"{r['train_tokens_per_s']:,.0f}{ci_tps}", float(r["train_tokens_per_s"])),
                count(r["trainable_params"]), size(r["adapter_bytes"]), text(r.get("flags", "")),
            ])
        out.append(Table(f"{task}", ["rank", "method", "family", metric, "interval over", "seeds", "learning rate",
                                     "peak memory MB", "train tokens/s", "trainable params", "adapter", "flags"],
                         rows, anchor=f"task-{task}"))
    return out


def baselines_table(rep: Report) -> Table:
    rows = []
    for _, r in rep.baselines.iterrows():
        rows.append([text(r["task"]), pm(r["majority"], r["majority_ci95"]), pm(r["zero_shot"], r["zero_shot_ci95"]),
                     text(r["best"] or "–"), pm(r["ref_diff"], r["ref_diff_ci95"]), pval(r["ref_p_holm"]),
                     text(r["ref_verdict"]), num(r["mdd80"])])
    return Table("Trivial baselines per task, LoRA against the best of them, and the minimum detectable difference",
                 ["task", "majority class", "zero-shot", "best trivial", "LoRA − best trivial (paired)",
                  "p (Holm over tasks)", "LoRA vs trivial", "MDD at 80% power (LoRA vs trivial)"], rows,
                 anchor="baselines")


def lr_selection_table(rep: Report) -> Table:
    def recorded(r) -> tuple[str, object]:   # "2 of 3" where the suite file gives the grid, else the count alone
        n, grid = int(r["rates_recorded"]), r["grid_rates"]
        return (str(n) if pd.isna(grid) else f"{n} of {int(grid)}"), float(n)

    def choice(r) -> str:
        if r["chosen"]:
            return "chosen"
        return f"leading, {int(r['rates_recorded'])} of {int(r['grid_rates'])} rates" if r["leading"] else ""

    rows = [[text(r["task"]), text(r["label"]), (f"{r['lr']:.3g}", float(r["lr"])),
             (str(r["n_seeds"]), float(r["n_seeds"])), num(r["val_score"]), recorded(r), text(choice(r))]
            for _, r in rep.lr_selection.iterrows()]
    return Table("Learning rates chosen on the validation split (mean validation score over seeds)",
                 ["task", "method", "learning rate", "seeds", "validation score", "rates recorded", "chosen"], rows,
                 anchor="lr-selection")


def curves_table(rep: Report) -> Table:
    rows = [[text(r["task"]), text(r["label"]), ("–", float("nan")) if isnan(r["lr"]) else (f"{r['lr']:.3g}", float(r["lr"])),
             (str(r["seed"]), float(r["seed"])), (str(r["points"]), float(r["points"])),
             (str(r["last_step"]), float(r["last_step"])), num(r["plateau"]), num(r["baseline"]),
             ("never", float("inf")) if isnan(r["reach95"]) else (f"{r['reach95']:.0f}", float(r["reach95"]))]
            for _, r in rep.curves.iterrows()]
    return Table("Validation curves: plateau (mean of the last 3 points) and the first step reaching 95% of the gain "
                 "over the trivial baseline", ["task", "method", "learning rate", "seed", "points", "last step",
                                               "plateau", "trivial baseline", "step reaching 95%"], rows,
                 anchor="curves")


def aggregate_table(rep: Report) -> Table:
    def iv(v, lo, hi) -> tuple[str, object]:
        return ("–", float("nan")) if isnan(v) else (f"{v:.3f} [{lo:.3f}, {hi:.3f}]", float(v))
    rows = [[text(r["label"]), text(family_title(r["family"])), (str(r["n_tasks"]), float(r["n_tasks"])),
             iv(r["iqm"], r["iqm_low"], r["iqm_high"]), iv(r["p_improve"], r["p_improve_low"], r["p_improve_high"])]
            for _, r in rep.aggregate.iterrows()]
    return Table("Across tasks: interquartile mean of the normalised score and probability of improvement over LoRA",
                 ["method", "family", "tasks", "IQM of (score − trivial) / (1 − trivial) [95% CI]",
                  "P(method > LoRA) [95% CI]"], rows, anchor="aggregate")


def average_rank_table(rep: Report) -> Table:
    rows = [[text(family_title(r["family"])), text(r["label"]), num(r["average_rank"], 2),
             (f"{r['n_tasks']}", float(r["n_tasks"])), text(r["tasks"])] for _, r in rep.average_rank.iterrows()]
    return Table("Average rank over tasks, grouped by survey family", ["family", "method", "average rank", "tasks run",
                                                                       "which tasks"], rows, anchor="average-rank")


def paired_tables(rep: Report) -> list[Table]:
    s = [[text(family_title(r["family"])), text(r["label"]), (str(r["tasks"]), float(r["tasks"])),
          (str(r["wins"]), float(r["wins"])), (str(r["ties"]), float(r["ties"])),
          (str(r["losses"]), float(r["losses"])), (str(r["identical"]), float(r["identical"])),
          (str(r["untested"]), float(r["untested"]))]
         for _, r in rep.paired_summary.iterrows()]
    d = [[text(r["label"]), text(r["task"]), (str(r["n_pairs"]), float(r["n_pairs"])),
          pm(r["diff"], r["diff_ci95"]), text(r["ci_kind"]), pval(r["p"]), pval(r["p_holm"]), num(r["mdd80"]),
          text(r["verdict"])] for _, r in rep.paired_detail.iterrows()]
    return [Table("Against LoRA: wins / ties / losses over tasks", ["family", "method", "tasks", "wins", "ties",
                                                                  "losses", "identical", "untested"], s, anchor="paired"),
            Table("Against LoRA, per task: paired difference (positive = better than LoRA)",
                  ["method", "task", "paired seeds", "difference (mean ± 95% interval)", "interval over", "p",
                   "p (Holm)", "MDD at 80% power", "verdict"], d, anchor="paired-detail")]


def failures_table(rep: Report) -> Table:
    rows = [[text(r["task"]), text(r["label"]), (str(r["seed"]), float(r["seed"])), text(one_line(r["error"]))]
            for _, r in rep.failures.iterrows()]
    return Table("Failed trials", ["task", "method", "seed", "reason"], rows, anchor="failures")


def findings_table(claims: pd.DataFrame) -> Table:
    rows = []
    for _, r in claims.iterrows():
        if r["verdict"] == "not yet measured":
            diff = ("–", float("nan"))
        else:
            diff = pm(r["diff"], r["diff_ci95"])
        mg = "" if isnan(r["margin"]) else f"{r['margin']:.4f}"
        notes = "; ".join(x for x in (r["extra"], r["why"]) if x)
        rows.append([text(r["claim"]), text(r["method"] + " vs " + r["reference"]), text(r["task"] or "–"),
                     (str(r["n_pairs"]), float(r["n_pairs"])), text(r["quantity"] or "–"), diff,
                     num(r["mdd80"]), text(mg), text(r["verdict"]), text(notes)])
    return Table("The survey's headline claims on these tasks", ["claim", "comparison", "task", "paired seeds",
                 "quantity", "difference (mean ± 95% CI)", "MDD at 80% power", "margin", "verdict", "notes"], rows,
                 anchor="findings")


def findings_summary(claims: pd.DataFrame) -> list[str]:
    out = []
    for claim in dict.fromkeys(claims["claim"]):
        src = claims[claims["claim"] == claim]["source"].iloc[0]
        out.append(f"{claim} ({src}): **{findings_mod.overall(claims, claim)}**")
    return out


def families_present(rep: Report) -> list[str]:
    fams = sorted(set(rep.summary["family"]) if len(rep.summary) else set(), key=lambda f: (family_order(f), f))
    return fams
