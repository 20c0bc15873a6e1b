"""`python -m lorabench report`: records -> Markdown, CSV, self-contained HTML and PNG plots.

Output layout under --out DIR (the published leaderboard is `results/`):

    LEADERBOARD.md      the report (coverage, notes, findings, tables, plots)
    leaderboard.csv     per task and method: mean and 95% CI of every measure, rank, seeds, failures
    average_rank.csv    per method: average rank over tasks, grouped by survey family
    paired.csv          per method and task: paired difference against lora, p (raw and Holm), MDD, verdict
    baselines.csv       per task: majority-class and zero-shot baselines, LoRA against the best, MDD
    lr_selection.csv    per task, method and learning rate: validation score, which rate was chosen (or leads a
                        grid not yet complete), how many of the grid's rates are recorded
    aggregate.csv       per method: IQM of normalised scores and P(improvement over lora) across tasks
    curves.csv          per trial with a validation curve: plateau and the step reaching 95% (when any)
    plots/curves-TASK.png  validation curves (when any)
    failures.csv        every failed trial with its reason
    federated.csv       the clients scenario (when any): per task, partition and method: global and personalised
                        scores, MB communicated, aggregation error; plots/federated-TASK-{rounds,mb}.png
    cross-task.csv      the cross-task scenario (when any): per held-out task and rule (baselines and composition
                        methods): score over seeds with its interval, best, spread, k-shot tokens
    cross-task-merges.csv   each weight-space merge's error against the exact weighted sum
    mixture.csv         the cross-task protocol (b) (when any): per split, task and method, accuracy with its interval
                        over seeds x examples, zero-shot rows, training and held-out averages (report/mixture.py)
    reuse.csv           the cross-task reuse protocol (when any): per pool task and rule (zero-shot, merged, the
                        method, own adapter), accuracy with its interval, the average, parameters per task (report/reuse.py)
    continual.csv       the sequence scenario (when any): per order and method: ACC, BWT, FWT with intervals, paired
                        differences from seq-lora, adapter norms; continual_sweeps.csv (penalty weights swept);
                        plots/continual-ORDER.png (the matrix R as heat maps). Continual records are reported there
                        only: their score is a sequence's, not a task's, so the per-task tables leave them out.
    forgetting.csv      continual forgetting (GS-LoRA's protocol, when any): per task, label and forgetting task:
                        H-mean, accuracy on the forgotten and the kept classes before and after, blocks whose group
                        is zero (report/forgetting.py); left out of the per-task tables too
    findings.csv        the survey's headline claims, per task, with the numbers behind each verdict
    leaderboard.html    one self-contained page: sortable, filterable tables and the plots
    plots/TASK.png, plots/average.png

Nothing written depends on the clock, the input order of equal rows or the machine running the
report, so the same records give the same bytes (a test checks it).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lorabench.errors import UserError
from lorabench.report import (continual, cross_task, curves, federated, findings, forgetting, mixture, plots, reuse,
                              tables)
from lorabench.report.html import markdown_section, render_html
from lorabench.report.markdown import render_markdown

FORMATS = ("md", "csv", "html", "png")
CSV_DIGITS = 6


def parse_formats(values: list[str] | None) -> list[str]:
    """'md,csv' and repeated --format flags; None = every format."""
    if not values:
        return list(FORMATS)
    out = []
    for v in values:
        for f in v.split(","):
            f = f.strip().lower()
            if not f:
                continue
            if f not in FORMATS:
                raise UserError(f"unknown report format {f!r}; valid: {', '.join(FORMATS)} (repeat --format or use a comma list)")
            if f not in out:
                out.append(f)
    return out


def coverage(rep: tables.Report) -> list[str]:
    """Which part of each suite these records cover, computed against the suite file as it is now."""
    from lorabench.runner.suite import load_suite, trial_id
    lines = []
    t = rep.trials
    if t.empty:
        return lines
    recorded = {r.get("trial_id") for r in rep.records}
    for (suite, version), g in t.groupby(["suite", "suite_version"], sort=True, dropna=False):
        mine = [r for r in rep.records if str(r.get("suite")) == str(suite)
                and str(r.get("suite_version")) == str(version)]
        n_ok = sum(1 for r in mine if r.get("status") == "ok")
        # rep.trials keeps only the chosen learning rate of a grid; the grid's other rates are trials too
        chosen = f"; {len(g)} at the chosen learning rates" if len(g) != len(mine) else ""
        what = (f"suite {suite} v{version}: {len(mine)} trial(s) recorded ({n_ok} ok{chosen}), "
                f"tasks {', '.join(sorted(set(g['task'])))}, seeds {', '.join(map(str, sorted(set(g['seed']))))}, "
                f"{len(set(g['label']))} method(s)")
        # subset selectors (tables.SELECTORS) keep trial ids; anything else changes the budget
        budget = sorted({o for r in rep.records if r.get("suite") == suite and r.get("suite_version") == version
                         for o in (r.get("overrides") or []) if isinstance(o, str) and not o.startswith(tables.SELECTORS)})
        if budget:
            what += f", run with overrides {' '.join(budget)} (not the suite's own budget)"
        try:
            s = load_suite(str(suite))
        except Exception as e:  # a foreign or since-renamed suite: say so, the records are still reported
            lines.append(what + f"; its suite file is not available here ({type(e).__name__}).")
            continue
        if s.version != version:
            lines.append(what + f"; suite file is now v{s.version}, so coverage against it is not computed.")
            continue
        specs = s.trials(rep.records)
        done = [sp for sp in specs if trial_id(sp) in recorded]
        pend = s.pending(rep.records)
        missing_tasks = sorted(({sp.task for sp in specs} | {t for t, _, _ in pend}) - {sp.task for sp in done})
        missing_methods = sorted(({sp.label for sp in specs} | {m for _, m, _ in pend}) - {sp.label for sp in done})
        part = f" Not yet run: tasks {', '.join(missing_tasks) or 'none'}"
        part += f"; methods never run {', '.join(missing_methods) or 'none'}."
        total = s.size()  # the trials waiting for a learning rate chosen on the tuning trials included
        waiting = sum(len(seeds) for _, _, seeds in pend)
        wait = (f" ({waiting} of them wait for a learning rate their tuning trials choose)" if waiting else "")
        lines.append(what + f"; that is {len(done)} of the {total} trials its suite file defines now{wait}"
                     + ("." if len(done) == total else "." + part))
    # The machine time of each part: trial wall times over the trials that ran at once (record `jobs`).
    busy: dict[tuple, float] = {}
    for r in rep.records:
        w, j = r.get("wall_s"), r.get("jobs", 1)
        if isinstance(w, (int, float)) and isinstance(j, int) and j >= 1 and r.get("task"):
            key = (str(r.get("suite")), str(r.get("suite_version")), str(r["task"]))
            busy[key] = busy.get(key, 0.0) + w / j
    if busy:
        lines.append("Machine time per part (sum of trial wall times / trials run at once): "
                     + "; ".join(f"{s} v{v} {task} {sec / 60:.0f} min" for (s, v, task), sec in sorted(busy.items()))
                     + ".")
    cpus = sorted({str(r.get("cpu")) for r in rep.records if r.get("cpu")})
    gpus = sorted({str(r.get("gpu")) for r in rep.records if r.get("gpu")})
    torch_versions = sorted({str((r.get("versions") or {}).get("torch")) for r in rep.records
                             if isinstance(r.get("versions"), dict) and r["versions"].get("torch")})
    if cpus or gpus:
        lines.append(f"Machine(s): {'; '.join(cpus + gpus)}; torch {', '.join(torch_versions) or 'unknown'}. Memory and "
                     f"throughput are per-trial measurements on that machine, slower when it was shared with other jobs.")
    return lines


def footer() -> str:
    import matplotlib
    return (f"Generated by lorabench's report with pandas {pd.__version__} and matplotlib {matplotlib.__version__} "
            f"(PNG bytes depend on the matplotlib version).")


def _csv(df: pd.DataFrame, path: Path) -> None:
    df = df.copy()
    for c in df.columns:
        if pd.api.types.is_float_dtype(df[c]):
            df[c] = df[c].round(CSV_DIGITS)
    df.to_csv(path, index=False, lineterminator="\n", float_format=f"%.{CSV_DIGITS}g")


def write_report(records: list[dict], out: str | Path, formats: list[str], notes: list[str] | None = None) -> list[Path]:
    """Write the chosen formats under `out`; returns the files written, in a fixed order. `notes` go
    first in the report's notes (tables.build)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sequences = continual.continual_records(records)
    def own_section(r: dict) -> bool:  # scenario records reported only in their own sections
        return any(isinstance(r.get(k), dict) for k in ("continual", "mixture", "reuse", "forgetting"))
    scenario = [r for r in records if own_section(r)]
    rep = tables.build([r for r in records if not own_section(r)], notes)
    claims = findings.evaluate(rep.trials)
    cov = coverage(rep)
    need_png = "png" in formats or "html" in formats or "md" in formats
    pngs = plots.task_plots(rep.summary) if need_png and len(rep.summary) else {}
    if need_png:
        pngs.update(curves.curve_plots(rep.all_trials, rep.baselines))
        pngs.update(federated.plots(records))  # the clients scenario (none without federated records)
        pngs.update(continual.plots(sequences))  # the sequence scenario (none without continual records)
    fed = federated.federated_frame(records)
    cross, merges = cross_task.cross_task_frame(records), cross_task.merge_frame(records)
    mix = mixture.mixture_frame(records)
    reu = reuse.reuse_frame(records)
    forget = forgetting.forgetting_frame(records)
    written: list[Path] = []

    def sections(with_plots: bool) -> tuple[list[str], list[str]]:
        """The scenario sections (Markdown lines): those after the per-task leaderboards, those after them."""
        fed_md = federated.markdown(fed, [n for n in sorted(pngs) if n.startswith("federated-")] if with_plots else [])
        fed_md += cross_task.markdown(cross, merges)   # the cross-task scenario's section (none without its records)
        fed_md += mixture.markdown(mix)   # its protocol (b) (none without mixture records)
        fed_md += reuse.markdown(reu)   # its reuse protocol (none without reuse records)
        cont_md = continual.markdown(sequences, [n for n in sorted(pngs) if n.startswith("continual-")] if with_plots else [])
        cont_md += forgetting.markdown(forget)   # continual forgetting (none without its records)
        return fed_md, cont_md

    if "md" in formats:
        p = out / "LEADERBOARD.md"
        names = [f"plots/{n}" for n in pngs] if "png" in formats else []
        fed_md, cont_md = sections(bool(names))
        p.write_text(render_markdown(rep, cov, claims, names, footer(), fed_md, cont_md, len(scenario)),
                     encoding="utf-8")
        written.append(p)
    if "csv" in formats:
        summary_cols = ["task", "family", "label", "method", "metric", "higher_is_better", "rank", "n_seeds",
                        "seeds", "n_failed", "lr", "ci_kind", "flags"] + [
                            c for m, _ in tables.MEASURES for c in (m, m + "_ci95")]
        frames = {"leaderboard.csv": rep.summary.reindex(columns=summary_cols),
                  "average_rank.csv": rep.average_rank, "paired.csv": rep.paired_detail,
                  "failures.csv": rep.failures, "findings.csv": claims, "baselines.csv": rep.baselines,
                  "lr_selection.csv": rep.lr_selection, "aggregate.csv": rep.aggregate}
        if len(rep.curves):
            frames["curves.csv"] = rep.curves
        if len(fed):
            frames["federated.csv"] = fed
        if len(cross):
            frames["cross-task.csv"] = cross
        if len(merges):
            frames["cross-task-merges.csv"] = merges
        if len(mix):
            frames["mixture.csv"] = mix
        if len(reu):
            frames["reuse.csv"] = reu
        if len(forget):
            frames["forgetting.csv"] = forget
        if sequences:
            frames["continual.csv"] = continual.continual_frame(sequences)
            sw = continual.sweeps(sequences)
            if len(sw):
                frames["continual_sweeps.csv"] = sw
        for name, df in frames.items():
            _csv(df, out / name)
            written.append(out / name)
    if "html" in formats:
        p = out / "leaderboard.html"
        fed_md, cont_md = sections(True)
        p.write_text(render_html(rep, cov, claims, pngs, footer(), markdown_section(fed_md + cont_md, pngs),
                                 len(scenario)), encoding="utf-8")
        written.append(p)
    if "png" in formats:
        (out / "plots").mkdir(exist_ok=True)
        for name, plot in sorted(pngs.items()):
            (out / "plots" / name).write_bytes(plot.png)
            written.append(out / "plots" / name)
    return written
