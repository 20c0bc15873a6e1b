"""Reports: statistics, tables, findings, the CLI, byte-for-byte reproducibility, and the standard
suite's coverage of the registry. Records are synthetic (built below) except where the committed
`results/` records are regenerated."""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pandas as pd
import pytest

from lorabench.cli import main
from lorabench.report import findings, leaderboard, stats, tables
from lorabench.report.build import FORMATS, parse_formats, write_report
from lorabench.report.plots import pareto_front

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
FAMILY = {"full": "baseline", "head": "baseline", "lora": "lora", "dora": "low-rank-bottleneck",
          "vera": "efficiency-freezing-sharing", "pissa": "learning-procedure"}
PARAMS = {"full": 22_000_000, "head": 770, "lora": 150_000, "dora": 160_000, "vera": 9_000, "pissa": 150_000}


def record(task, label, seed, score=None, status="ok", curve_start=0.7, **extra):
    r = {"record_version": 1, "trial_id": f"{task}-{label}-{seed}", "suite": "synthetic", "suite_version": 1,
         "label": label, "method": label, "task": task, "seed": seed, "status": status}
    if status == "ok":
        r.update(metric="accuracy", higher_is_better=True, score=score, family=FAMILY[label],
                 peak_rss_mb=900.0 + seed, train_tokens_per_s=3000.0 + 10 * seed, trainable_params=PARAMS[label],
                 adapter_bytes=4 * PARAMS[label], train={"steps": 100, "batch_size": 16, "loss_curve_every": 10},
                 loss_curve=[round(curve_start - 0.02 * i, 4) for i in range(8)], method_config={"rank": 8})
    else:
        r["error"] = "RuntimeError: CUDA out of memory | second part\nand a second line"
    r.update(extra)
    return r


def standard_like(missing_seed=True, failed=True, unknown=True) -> list[dict]:
    """Two tasks, five methods, three seeds; optionally one failure, one missing seed, one unknown field."""
    rng = random.Random(0)
    means = {"full": 0.86, "head": 0.70, "lora": 0.84, "dora": 0.85, "vera": 0.835}
    out = []
    for task in ("rt-sentiment", "sarcasm"):
        for label, m in means.items():
            for seed in range(3):
                if missing_seed and task == "sarcasm" and label == "vera" and seed == 2:
                    continue
                if failed and task == "sarcasm" and label == "dora" and seed == 1:
                    out.append(record(task, label, seed, status="failed"))
                    continue
                extra = {"mystery_field": 1} if unknown and label == "head" and seed == 0 and task == "sarcasm" else {}
                out.append(record(task, label, seed, round(m + rng.gauss(0, 0.004), 4), **extra))
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- statistics ------------------------------------------------------------------------------

# (the statistics themselves: tests/test_report_stats.py)


def test_pareto_front():
    # x lower is better, y higher is better: (1, .5) and (3, .9) are the front; (2, .4) and (4, .8) are dominated.
    assert pareto_front([1, 2, 3, 4], [0.5, 0.4, 0.9, 0.8], True, True) == [True, False, True, False]
    # throughput: x higher is better
    assert pareto_front([10, 20], [0.9, 0.8], False, True) == [True, True]
    assert pareto_front([10, 20], [0.9, 0.95], False, True) == [False, True]


# --- tables ----------------------------------------------------------------------------------

def test_summary_ranks_cis_and_notes_with_a_failure_a_missing_seed_and_an_unknown_field():
    recs = standard_like()
    rep = tables.build(recs)
    s = rep.summary.set_index(["task", "label"])
    # means and CIs are the Student-t ones over the ok seeds
    lora = [r["score"] for r in recs if r["task"] == "rt-sentiment" and r["label"] == "lora"]
    assert s.loc[("rt-sentiment", "lora"), "score"] == pytest.approx(sum(lora) / 3)
    assert s.loc[("rt-sentiment", "lora"), "score_ci95"] == pytest.approx(stats.mean_ci95(lora)[1])
    # ranks follow the means, best first
    rt = rep.summary[rep.summary["task"] == "rt-sentiment"]
    assert list(rt["label"]) == ["full", "dora", "lora", "vera", "head"]
    assert list(rt["rank"]) == [1, 2, 3, 4, 5]
    # the failed seed is counted as failed, not averaged in, and listed with its reason
    assert s.loc[("sarcasm", "dora"), "n_seeds"] == 2 and s.loc[("sarcasm", "dora"), "n_failed"] == 1
    assert list(rep.failures["label"]) == ["dora"] and "out of memory" in rep.failures["error"].iloc[0]
    notes = "\n".join(rep.notes)
    assert "vera on sarcasm: no record for seed(s) 2" in notes
    assert "mystery_field (1 record)" in notes
    assert "1 trial(s) failed" in notes
    # average rank: over the tasks each method ran; grouped by survey family (baselines first)
    ar = rep.average_rank
    assert list(ar["family"])[:2] == ["baseline", "baseline"]
    assert ar.set_index("label").loc["full", "average_rank"] == 1.0


def test_paired_comparison_against_lora():
    recs = [record("t", "lora", s, 0.80 + 0.01 * s) for s in range(3)]
    recs += [record("t", "dora", s, 0.85 + 0.01 * s + 0.001 * (s == 1)) for s in range(3)]  # +0.05 on every seed
    recs += [record("t", "vera", s, 0.80 + 0.01 * s + (0.02, -0.02, 0.001)[s]) for s in range(3)]
    recs += [record("t", "head", s, 0.50) for s in range(3)]
    recs += [record("t", "full", 0, 0.9)]  # one seed: untested
    rep = tables.build(recs)
    v = rep.paired_detail.set_index("label")["verdict"].to_dict()
    assert v == {"dora": "win", "vera": "tie", "head": "loss", "full": "untested"}
    summ = rep.paired_summary.set_index("label")
    assert summ.loc["dora", ["wins", "ties", "losses"]].tolist() == [1, 0, 0]
    assert rep.paired_detail.set_index("label").loc["dora", "diff"] == pytest.approx(0.05 + 0.001 / 3)


def test_lower_is_better_metrics_are_ranked_and_compared_the_right_way():
    recs = []
    for s in range(3):
        for label, ppl in (("lora", 20.0), ("dora", 18.0), ("full", 25.0)):
            # differences that vary a little by seed: constant ones would be untestable (no variance)
            recs.append(record("lm", label, s, ppl + 0.1 * s + (0.05 * s * s if label != "lora" else 0.0),
                               metric="perplexity", higher_is_better=False))
    rep = tables.build(recs)
    assert list(rep.summary["label"]) == ["dora", "lora", "full"]
    v = rep.paired_detail.set_index("label")["verdict"].to_dict()
    assert v == {"dora": "win", "full": "loss"}


def test_malformed_records_get_notes_not_crashes():
    recs = [record("t", "lora", 0, 0.8), record("t", "lora", 1, 0.81),
            {"status": "ok", "score": 0.5},                                   # no task/label/method/seed
            record("t", "dora", 0, None),                                      # ok without a score
            record("t", "dora", 1, 0.9, status="weird"),                       # unknown status
            record("t", "lora", 1, 0.82),                                      # duplicate (task, label, seed)
            {**record("t", "lora", 0, 0.9), "seed": "two"}]                    # a seed that is not a number
    rep = tables.build(recs)
    notes = "\n".join(rep.notes)
    assert "Record 3 lacks task, label, method, seed" in notes
    assert "repeat a (task, method label, seed, learning rate)" in notes
    assert "Record 7 has seed 'two', not an integer" in notes
    assert set(rep.failures["label"]) == {"dora"}
    assert any("not a finite number" in e for e in rep.failures["error"])
    assert any("status 'weird'" in e for e in rep.failures["error"])
    assert rep.summary.set_index("label").loc["lora", "score"] == pytest.approx((0.8 + 0.82) / 2)


def test_a_method_whose_every_trial_failed_is_shown_as_failed():
    recs = [record("t", "lora", s, 0.8) for s in range(2)] + [record("t", "dora", s, status="failed") for s in range(2)]
    rep = tables.build(recs)
    row = rep.summary.set_index("label").loc["dora"]
    assert row["n_seeds"] == 0 and row["n_failed"] == 2 and math.isnan(row["rank"])
    assert "FAILED dora (seed 0)" in leaderboard.render(recs)
    from lorabench.report.display import leaderboard_tables
    (t,) = leaderboard_tables(rep)
    dora = next(row for row in t.rows if row[1][0] == "dora")
    assert dora[0][0] == "failed" and dora[5][0] == "0 (2 failed)"


# --- findings --------------------------------------------------------------------------------

def test_findings_verdicts_are_computed_and_unmeasured_claims_say_so():
    recs = []
    for s in range(3):
        recs += [record("t", "lora", s, 0.80 + 0.01 * s, curve_start=0.70),
                 record("t", "full", s, 0.95 + 0.01 * s),                      # LoRA 15 points behind: does not hold
                 record("t", "dora", s, 0.85 + 0.01 * s + 0.001 * s),          # +5 points every seed: holds
                 record("t", "vera", s, 0.80 + 0.01 * s + (0.03, -0.03, 0.0)[s]),  # too noisy: inconclusive
                 record("t", "pissa", s, 0.80, curve_start=0.50 + 0.01 * s)]  # lower early loss: holds
    rows = findings.evaluate(tables.build(recs).trials)
    by = rows.set_index("claim")["verdict"].to_dict()
    assert by["LoRA approaches full fine-tuning"] == "does not hold"
    assert by["DoRA beats LoRA at equal rank"] == "holds"
    assert by["VeRA matches LoRA with far fewer trainable parameters"] == "inconclusive"
    assert by["PiSSA converges faster than LoRA early in training"] == "holds"
    assert by["QLoRA matches 16-bit LoRA"] == "not yet measured"
    assert by["LoRA+ speeds up convergence"] == "not yet measured"
    vera = rows.set_index("claim").loc["VeRA matches LoRA with far fewer trainable parameters"]
    assert "0.06x" in vera["extra"]
    assert findings.overall(rows, "DoRA beats LoRA at equal rank") == "holds on 1 of 1 task"


def test_early_convergence_reads_the_training_loss_then_the_validation_curve_and_refuses_single_batch_losses():
    # loss curves of 10-step windows (the same batches for a seed) and validation curves: the verdict reads the
    # training loss (PiSSA lower early on every seed), the validation reading (PiSSA behind) is shown beside it
    recs = []
    for s in range(3):
        recs += [record("t", "lora", s, 0.80, curve_start=0.70,
                        val_curve=[[10, 0.60], [20, 0.70], [30, 0.75], [40, 0.78]]),
                 record("t", "pissa", s, 0.80, curve_start=0.50 + 0.01 * s,
                        val_curve=[[10, 0.55 - 0.01 * s], [20, 0.70], [30, 0.75], [40, 0.78]])]
    row = findings.evaluate(tables.build(recs).trials).set_index("claim").loc[
        "PiSSA converges faster than LoRA early in training"]
    assert row["verdict"] == "holds" and row["quantity"].startswith("early training loss")
    assert row["diff"] == pytest.approx(0.19)  # reference - method: 0.70 - mean(0.50, 0.51, 0.52)
    assert row["extra"].startswith("early validation score (method - reference): -0.0600 ± ")
    # the validation curve decides where the loss curve's windows are single steps: PiSSA ahead early
    recs = []
    for s in range(3):
        one_step = {"steps": 10, "batch_size": 4, "loss_curve_every": 1}
        recs += [record("t", "lora", s, 0.80, curve_start=0.50, train=one_step,
                        val_curve=[[10, 0.60], [20, 0.70], [30, 0.75], [40, 0.78]]),
                 record("t", "pissa", s, 0.80, curve_start=0.70, train=one_step,
                        val_curve=[[10, 0.66 + 0.01 * s], [20, 0.72], [30, 0.76], [40, 0.78]])]
    row = findings.evaluate(tables.build(recs).trials).set_index("claim").loc[
        "PiSSA converges faster than LoRA early in training"]
    assert row["verdict"] == "holds" and "validation" in row["quantity"] and row["extra"] == ""
    assert row["diff"] == pytest.approx(0.07)
    # no validation curve and a loss curve of single-step windows: inconclusive, with the reason
    recs = []
    for s in range(3):
        one_step = {"steps": 10, "batch_size": 4, "loss_curve_every": 1}
        recs += [record("t", "lora", s, 0.80, curve_start=0.70, train=one_step),
                 record("t", "pissa", s, 0.80, curve_start=0.50 + 0.01 * s, train=one_step)]
    row = findings.evaluate(tables.build(recs).trials).set_index("claim").loc[
        "PiSSA converges faster than LoRA early in training"]
    assert row["verdict"] == "inconclusive" and "single-batch noise" in row["why"]


def test_findings_flag_unequal_ranks_for_dora():
    recs = []
    for s in range(3):
        recs += [record("t", "lora", s, 0.80), record("t", "dora", s, 0.90 + 0.001 * s, method_config={"rank": 16})]
    rows = findings.evaluate(tables.build(recs).trials).set_index("claim")
    assert rows.loc["DoRA beats LoRA at equal rank", "verdict"] == "inconclusive"
    assert "ranks differ" in rows.loc["DoRA beats LoRA at equal rank", "why"]


# --- outputs and the CLI ---------------------------------------------------------------------

def test_cli_writes_every_format_and_the_outputs_say_what_happened(tmp_path, capsys):
    recs = standard_like()
    src = write_jsonl(tmp_path / "records.jsonl", recs)
    out = tmp_path / "out"
    assert main(["report", str(src), "--format", "md,csv", "--format", "html", "--format", "png", "--out", str(out)]) == 0
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert set(names) == {"LEADERBOARD.md", "average_rank.csv", "failures.csv", "findings.csv", "leaderboard.csv",
                          "leaderboard.html", "paired.csv", "baselines.csv", "lr_selection.csv", "aggregate.csv",
                          "plots/average.png", "plots/rt-sentiment.png", "plots/sarcasm.png"}
    md = (out / "LEADERBOARD.md").read_text()
    assert "| sarcasm | dora | 1 | RuntimeError: CUDA out of memory \\| second part and a second line |" in md
    assert "vera on sarcasm: no record for seed(s) 2" in md and "mystery_field" in md
    assert "QLoRA matches 16-bit LoRA" in md and "not yet measured" in md
    assert "Holm-corrected over all comparisons" in md and "## Trivial baselines and power" in md
    csv = pd.read_csv(out / "leaderboard.csv")
    assert set(csv["label"]) == {"full", "head", "lora", "dora", "vera"}
    assert (pd.read_csv(out / "failures.csv")["label"] == "dora").all()
    html = (out / "leaderboard.html").read_text()
    assert "data:image/png;base64," in html and "<script" in html
    assert "http://" not in html and "https://" not in html and "src=\"http" not in html  # self-contained
    for png in (out / "plots").iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # md to stdout without --out
    capsys.readouterr()
    assert main(["report", str(src)]) == 0
    assert capsys.readouterr().out.startswith("# lorabench leaderboard")


def test_cli_errors_are_clear(tmp_path, capsys):
    src = write_jsonl(tmp_path / "r.jsonl", [record("t", "lora", 0, 0.8)])
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(src), "--format", "pdf", "--out", str(tmp_path / "o")]) == 2
    assert "unknown report format 'pdf'; valid: md, csv, html, png" in capsys.readouterr().err
    assert main(["report", str(src), "--format", "csv"]) == 2
    assert "give --out DIR" in capsys.readouterr().err
    assert parse_formats(None) == list(FORMATS) and parse_formats(["png,md", "md"]) == ["png", "md"]


def test_two_runs_write_identical_bytes_including_png(tmp_path):
    recs = standard_like()
    a = write_report(recs, tmp_path / "a", list(FORMATS))
    b = write_report(recs, tmp_path / "b", list(FORMATS))
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), f"{pa.name} differs between two runs"
    assert any(p.suffix == ".png" for p in a)
    assert b"Software" not in (tmp_path / "a" / "plots" / "sarcasm.png").read_bytes()


def test_record_order_does_not_change_the_tables(tmp_path):
    recs = standard_like(unknown=False)
    a = write_report(recs, tmp_path / "a", ["md", "csv"])
    b = write_report(list(reversed(recs)), tmp_path / "b", ["md", "csv"])
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), f"{pa.name} depends on the order of the records"


# --- the published leaderboard ---------------------------------------------------------------

# Each published report and the committed records it is generated from: the boards' leaderboard in
# results/, the budget curves (suites/budget.yaml) in results/budget/, kept apart so that the
# curves' long LoRA runs never enter a board's tables, and the continual runs in results/continual/.
PUBLISHED = ((RESULTS, ("standard",)), (RESULTS / "budget", ("budget",)),
             (RESULTS / "continual", ("continual",)),   # the sequence scenario (docs/continual.md)
             (RESULTS / "cross-task", ("cross-task",)),  # the leave-one-task-out protocol (docs/cross-task.md)
             (RESULTS / "claims", ("claims",)),          # the claims board (docs/leaderboard.md)
             (RESULTS / "precision", ("precision",)),    # bf16 autocast against fp32 (docs/leaderboard.md)
             (RESULTS / "federated", ("federated",)),    # the clients scenario, suite v2 (docs/federated.md)
             (RESULTS / "standard-v3", ("standard-v3",)))  # the full board's v3 parts until it is complete


def published_reports() -> list[tuple[Path, list[Path]]]:
    out = []
    for target, parts in PUBLISHED:
        files = [RESULTS / part / "records.jsonl" for part in parts if (RESULTS / part / "records.jsonl").exists()]
        if files:
            out.append((target, files))
    return out


@pytest.mark.skipif(not published_reports(), reason="no committed records under results/ yet")
@pytest.mark.parametrize("target,files", published_reports(), ids=lambda x: str(x) if isinstance(x, Path) else "")
def test_published_leaderboard_regenerates_byte_for_byte(tmp_path, target, files):
    """The documented commands (docs/leaderboard.md) reproduce results/ from the committed records."""
    import matplotlib
    out = tmp_path / "results"
    assert main(["report", *map(str, files), "--out", str(out)]) == 0
    md = (target / "LEADERBOARD.md").read_text()
    same_matplotlib = f"matplotlib {matplotlib.__version__} " in md
    # The footer names the pandas that rendered it; a newer pandas on the package index (3.1.1 -> 3.1.2 failed CI
    # once) may render the same tables, so only the footer's version is mapped back; every other byte is compared.
    committed_pandas = re.search(r"report with pandas (\S+) and matplotlib", md)
    assert committed_pandas, f"{target.relative_to(ROOT)}/LEADERBOARD.md has no generator footer"
    version_swap = (f"with pandas {pd.__version__} and".encode(), f"with pandas {committed_pandas[1]} and".encode())
    hint = (f"{target.relative_to(ROOT)}/ is stale: run `python -m lorabench report "
            f"{' '.join(str(f.relative_to(ROOT)) for f in files)} --out {target.relative_to(ROOT)}` and commit the result")
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(out)
        if p.suffix in (".png", ".html") and not same_matplotlib:
            continue  # PNG bytes (also embedded in the HTML) depend on the matplotlib version
        committed = target / rel
        assert committed.exists(), f"{rel} is generated but not committed; {hint}"
        generated = p.read_bytes()
        if p.suffix in (".md", ".html"):
            generated = generated.replace(*version_swap)
        assert committed.read_bytes() == generated, f"{rel} differs; {hint}"


# --- the standard suite ----------------------------------------------------------------------

def test_standard_suite_covers_every_registered_method():
    from lorabench.methods import METHODS
    from lorabench.runner.suite import load_suite
    suite = load_suite("standard")
    listed = {m.name for m in suite.methods}
    # federated methods have their own board, the clients scenario's suite (issue 19)
    federated = {n for n in METHODS.names() if METHODS.meta(n)["family"] == "federated"}
    assert federated <= {m.name for m in load_suite("federated").methods}
    # cross-task composition rules (issue 17) are scored by the multi-task scenario, not on single-task boards
    cross_task = {n for n in METHODS.names() if METHODS.meta(n)["family"] == "cross-task"}
    # ... composition rules by its protocol (a), mixtures of LoRA experts by its protocol (b), reuse by its reuse protocol
    assert cross_task <= {m.name for m in load_suite("cross-task").methods} | {
        m.name for m in load_suite("mixture").methods} | {m.name for m in load_suite("reuse").methods}
    # so do the continual methods: the sequence scenario's suite (issue 18)
    continual = {n for n in METHODS.names() if METHODS.meta(n)["family"] == "continual"}
    # (GS-LoRA, continual forgetting, by its own protocol's suite)
    assert continual <= {m.name for m in load_suite("continual").methods} | {
        m.name for m in load_suite("continual-forgetting").methods}
    missing = sorted(set(METHODS.names()) - listed - federated - cross_task - continual)
    assert not missing, (f"suites/standard.yaml lacks registered method(s): {', '.join(missing)}; add one line each "
                         f"under 'methods:' (and re-run the standard suite for them)")
    assert {t.name for t in suite.tasks} >= {"rt-sentiment", "sarcasm", "quartz"}
    assert suite.seeds == [0, 1, 2]
    models = {t.name: t.model for t in suite.tasks}
    assert models["rt-sentiment"] == models["sarcasm"] == "minilm-l6" and models["quartz"] == "smollm2-135m"


def test_leaderboard_render_still_prints_one_block_per_task():
    text = leaderboard.render(standard_like())
    assert "== rt-sentiment ==" in text and "== sarcasm ==" in text and "FAILED dora (seed 1)" in text
    assert leaderboard.render([]) == "no records"


def test_coverage_says_which_part_of_the_suite_was_run_and_flags_budget_overrides():
    from lorabench.report.build import coverage
    from lorabench.runner.suite import load_suite, trial_id
    suite = load_suite("standard")
    specs = suite.trials()
    recs = []
    for spec in specs[:2]:
        recs.append(record(spec.task, spec.label, spec.seed, 0.8, trial_id=trial_id(spec), suite="standard",
                           suite_version=suite.version, overrides=["tasks=rt-sentiment", "seeds=0,1,2"]))
    (line,) = coverage(tables.build(recs))
    assert f"that is 2 of the {suite.size()} trials its suite file defines now" in line
    assert "Not yet run: tasks quartz, sarcasm" in line and "overrides" not in line
    recs[0]["overrides"] = ["train.steps=3"]
    (line,) = coverage(tables.build(recs))
    assert "run with overrides train.steps=3 (not the suite's own budget)" in line
    # the machine time of a part: wall times over the trials that ran at once
    recs[0].update(wall_s=90.0, jobs=2)
    recs[1].update(wall_s=75.0)  # no `jobs`: one at a time
    line, busy = coverage(tables.build(recs))
    assert f"standard v{suite.version} {specs[0].task} 2 min." in busy  # (90 / 2 + 75) s = 2 min


def test_coverage_counts_the_trials_that_wait_for_a_tuned_learning_rate():
    """A board with tune_seeds: its other seeds' trials are not runnable before the grid is recorded, but they are
    trials the suite defines: the coverage line counts them (it said "24 of the 96" of claims' 152 before)."""
    from lorabench.report.build import coverage
    from lorabench.runner.suite import load_suite, trial_id
    suite = load_suite("claims")
    spec = suite.trials()[0]
    recs = [record(spec.task, spec.label, spec.seed, 0.8, trial_id=trial_id(spec), suite="claims",
                   suite_version=suite.version)]
    waiting = sum(len(seeds) for _, _, seeds in suite.pending(recs))
    assert waiting > 0 and suite.size() > len(suite.trials(recs))
    (line,) = coverage(tables.build(recs))
    assert (f"that is 1 of the {suite.size()} trials its suite file defines now ({waiting} of them wait for a "
            f"learning rate their tuning trials choose)") in line, line


def test_a_partial_grid_is_leading_not_chosen_and_the_runner_waits_for_the_whole_grid(tmp_path):
    """The claims board's grid for lora on rt-sentiment (0.3x, 1x, 3x on seed 0) with 2 of its 3 rates recorded:
    the runner runs no other seed yet, and the report says the best rate so far leads a partial grid (Markdown,
    HTML, lr_selection.csv, a note); with the third rate recorded it is chosen and the other seeds are runnable."""
    from lorabench.report.build import write_report
    from lorabench.runner.suite import load_suite, trial_id
    suite = load_suite("claims")
    grid = [sp for sp in suite.trials() if sp.task == "rt-sentiment" and sp.label == "lora"]
    assert [sp.seed for sp in grid] == [0, 0, 0] and suite.grid_rates("rt-sentiment", "lora") == [
        sp.train["lr"] for sp in grid]
    val = {0: 0.80, 1: 0.84, 2: 0.82}   # the middle rate is best on validation
    recs = []
    for i, sp in enumerate(grid):
        r = record("rt-sentiment", "lora", 0, 0.8 + i / 100, trial_id=trial_id(sp), suite="claims",
                   suite_version=suite.version, val_score=val[i], overrides=["tasks=rt-sentiment"])
        r["train"] = dict(r["train"], lr=sp.train["lr"])
        recs.append(r)
    low, mid, high = (sp.train["lr"] for sp in grid)
    partial = [recs[0], recs[1]]
    assert ("rt-sentiment", "lora", [1, 2, 3, 4]) in suite.pending(partial)
    assert not [sp for sp in suite.trials(partial) if sp.task == "rt-sentiment" and sp.label == "lora" and sp.seed]
    rep = tables.build(partial)
    sel = rep.lr_selection.set_index("lr")
    assert list(sel.index) == [low, mid] and not sel["chosen"].any()
    assert list(sel["leading"]) == [False, True] and set(sel["rates_recorded"]) == {2} and set(sel["grid_rates"]) == {3}
    assert f"lora on rt-sentiment: 2 of its grid's 3 learning rates recorded (not yet {high:g})" in "\n".join(rep.notes)
    assert list(rep.trials["lr"]) == [mid]   # the other tables report the leading rate
    write_report(partial, tmp_path / "partial", ["md", "csv", "html"])
    md = (tmp_path / "partial" / "LEADERBOARD.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| rt-sentiment | lora | 0.001 |"))
    assert row.endswith("| 2 of 3 | leading, 2 of 3 rates |"), row
    assert "leading, 2 of 3 rates" in (tmp_path / "partial" / "leaderboard.html").read_text()
    csv = pd.read_csv(tmp_path / "partial" / "lr_selection.csv")
    assert list(csv.columns[-4:]) == ["chosen", "leading", "rates_recorded", "grid_rates"]
    assert list(csv["leading"]) == [False, True] and list(csv["rates_recorded"]) == [2, 2]
    # the whole grid: the middle rate is chosen, nothing leads, and the other seeds run at it
    rep = tables.build(recs)
    sel = rep.lr_selection.set_index("lr")
    assert list(sel["chosen"]) == [False, True, False] and not sel["leading"].any()
    assert set(sel["rates_recorded"]) == {3} and not any("learning rates recorded" in n for n in rep.notes)
    rest = [sp for sp in suite.trials(recs) if sp.task == "rt-sentiment" and sp.label == "lora" and sp.seed]
    assert sorted((sp.seed, sp.train["lr"]) for sp in rest) == [(s, mid) for s in (1, 2, 3, 4)]
    # a part run with other overrides than selectors is read with them: lr_grid=1 runs no grid
    assert tables.suite_grids([dict(partial[0], overrides=["tasks=rt-sentiment", "lr_grid=1"])]) == {}
    assert tables.suite_grids(partial[:1]) == {("rt-sentiment", "lora"): [low, mid, high]}
    # records whose suite file is not here keep the rule of the recorded rates: 2 recorded rates, the best chosen
    foreign = [dict(r, suite="no-such-suite") for r in partial]
    sel = tables.build(foreign).lr_selection
    assert list(sel["chosen"]) == [False, True] and sel["grid_rates"].isna().all()


def test_coverage_counts_every_recorded_trial_of_a_grid_not_only_the_chosen_rate():
    from lorabench.report.build import coverage
    recs = [record("rt-sentiment", "lora", 0, 0.8, suite="gridded", val_score=v, trial_id=f"t{lr}")
            for lr, v in ((1e-4, 0.7), (1e-3, 0.8), (1e-2, 0.6))]
    for r, lr in zip(recs, (1e-4, 1e-3, 1e-2)):
        r["train"] = dict(r["train"], lr=lr)
    (line,) = coverage(tables.build(recs))
    assert "suite gridded v1: 3 trial(s) recorded (3 ok; 1 at the chosen learning rates)" in line, line


# --- scenario sections in the page, and scenario-only reports ------------------------------------------------

def _headings(md: str, html: str) -> tuple[list[str], list[str]]:
    import html as _html
    import re
    return ([ln[3:] for ln in md.splitlines() if ln.startswith("## ")],
            [_html.unescape(h) for h in re.findall(r"<h2>(.*?)</h2>", html)])


@pytest.mark.skipif(not (RESULTS / "federated" / "records.jsonl").exists(), reason="no federated records committed")
def test_the_page_shows_every_section_the_markdown_shows(tmp_path):
    """leaderboard.html left out the federated, cross-task, mixture, reuse and forgetting sections that LEADERBOARD.md
    had (only the continual one had an HTML twin): the page now renders the same Markdown sections, with their
    tables sortable and their plots embedded."""
    import re
    write_report([json.loads(x) for x in (RESULTS / "federated" / "records.jsonl").read_text().splitlines()],
                 tmp_path, ["md", "html", "png"])
    md, page = (tmp_path / "LEADERBOARD.md").read_text(), (tmp_path / "leaderboard.html").read_text()
    in_md, in_page = _headings(md, page)
    assert "Federated (the clients scenario)" in in_md and in_page == in_md
    fed = page[page.index("<h2>Federated (the clients scenario)</h2>"):page.index("<h2>Average rank</h2>")]
    rows = re.findall(r"<tr><td", fed)
    md_rows = [ln for ln in md.split("## Federated (the clients scenario)")[1].split("## Average rank")[0].splitlines()
               if ln.startswith("| rt-sentiment |")]
    assert len(rows) == len(md_rows) > 0
    assert '<table class="sortable"' in fed and fed.count("data:image/png;base64,") == len(
        re.findall(r"^!\[", md.split("## Federated")[1].split("## Average rank")[0], re.M)) > 0
    assert 'data-sort="0.51">0.510 ± ' in fed or re.search(r'data-sort="0\.\d+">0\.\d{3} ± 0\.\d{3}<', fed)


def test_a_report_of_scenario_records_only_counts_them_and_leaves_out_the_empty_single_task_sections(tmp_path):
    """A continual suite's report said "from 0 record(s)", "(no records)" under What was run, and printed empty
    findings, baseline, rank and paired tables around its one real section."""
    from tests.test_continual import _record
    recs = [_record("seq-lora@o", "seq-lora", seed, [["1111", "0000"], ["0011", "1111"]], ["0000", "0000"])
            for seed in (0, 1)]
    write_report(recs, tmp_path, ["md", "html"])
    md, page = (tmp_path / "LEADERBOARD.md").read_text(), (tmp_path / "leaderboard.html").read_text()
    assert "from 2 record(s)" in md and "from 2 record(s)" in page
    assert "2 scenario record(s)" in md and "(no records)" not in md
    in_md, in_page = _headings(md, page)
    assert in_md == in_page == ["What was run", "Notes", "Continual learning (the sequence scenario)", "Failed trials"]
    # with a single-task record beside them, every section is back
    write_report(recs + [record("rt-sentiment", "lora", 0, 0.7)], tmp_path / "both", ["md"])
    both = (tmp_path / "both" / "LEADERBOARD.md").read_text()
    assert "from 3 record(s)" in both and "## Findings: the survey's headline claims" in both
    assert "## Continual learning (the sequence scenario)" in both


def test_trials_timed_on_a_busy_machine_are_named_in_the_notes():
    """Records carry the 1-minute load average read through the trial (runner/run.py): a trial that shared the
    cores with other work has times that compare only with trials run alike, and the report says which."""
    recs = [record("rt-sentiment", "lora", s, 0.8, load={"mean": m, "max": m + 1, "cores": 2})
            for s, m in ((0, 0.9), (1, 3.4))] + [record("rt-sentiment", "head", 0, 0.6)]
    rep = tables.build(recs)
    (note,) = [n for n in rep.notes if "load average" in n]
    assert note.startswith("1 of 2 timed trial(s)") and "at most 3.4 on 2 cores" in note and "lora on rt-sentiment" in note
    assert not [n for n in rep.notes if n.startswith("Unknown record fields")]
    quiet = tables.build([record("rt-sentiment", "lora", 0, 0.8, load={"mean": 1.9, "max": 2.5, "cores": 2})])
    assert not [n for n in quiet.notes if "load average" in n]
