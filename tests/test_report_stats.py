"""The board's statistics (lorabench/report/stats.py and the per-example parts of report/tables.py):
intervals that carry seed and evaluation-sample variance, checked by simulation; Holm; no certain
sign from zero variance; learning-rate selection on validation; trivial baselines; flags."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats as sps

from lorabench.report import display, findings, stats, tables
from lorabench.tasks.base import Outcomes


def test_mean_ci95_is_the_student_t_interval():
    xs = [0.81, 0.84, 0.83]
    mean, hw, n = stats.mean_ci95(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / 2)
    assert n == 3 and mean == pytest.approx(sum(xs) / 3)
    assert hw == pytest.approx(sps.t.ppf(0.975, 2) * sd / math.sqrt(3))
    assert math.isnan(stats.mean_ci95([0.5])[1]) and stats.mean_ci95([])[2] == 0
    assert stats.mean_ci95([1.0, float("nan"), None, 3.0])[:2] == pytest.approx((2.0, sps.t.ppf(0.975, 1)))


def test_crossed_reduces_to_the_one_factor_cases():
    seeds = np.array([[0.80], [0.83], [0.85]])
    e = stats.crossed(seeds)
    assert e.kind == "seeds only" and e.df == 2
    assert e.ci95 == pytest.approx(stats.mean_ci95(seeds.ravel())[1])
    one = np.array([[1, 0, 1, 1, 0, 1, 1, 1.0]])
    e = stats.crossed(one)
    assert e.kind == "examples only (1 seed)" and e.df == 7
    assert e.se == pytest.approx(one.std(ddof=1) / math.sqrt(8))
    with pytest.raises(ValueError, match="2-D"):
        stats.crossed(np.zeros(3))


def test_crossed_variance_is_the_anova_estimate():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 50)) + rng.normal(size=(3, 1)) + rng.normal(size=(1, 50))
    s, n = x.shape
    m = x.mean()
    ms_s = n * ((x.mean(1) - m) ** 2).sum() / (s - 1)
    ms_e = s * ((x.mean(0) - m) ** 2).sum() / (n - 1)
    r = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + m
    ms_r = (r ** 2).sum() / ((s - 1) * (n - 1))
    e = stats.crossed(x)
    assert e.se ** 2 == pytest.approx((ms_s + ms_e - ms_r) / (s * n))
    assert e.kind == "seeds x examples" and 2 <= e.df <= (s - 1) * (n - 1)


def _coverage(sd_seed: float, sd_example: float, sd_noise: float, sims: int = 1500, seeds: int = 3,
              examples: int = 200, seeds_only: bool = False) -> float:
    """How often the 95% interval covers the true mean when seeds AND examples are random draws."""
    rng = np.random.default_rng(12345)
    hit = 0
    for _ in range(sims):
        x = (0.7 + rng.normal(0, sd_seed, (seeds, 1)) + rng.normal(0, sd_example, (1, examples))
             + rng.normal(0, sd_noise, (seeds, examples)))
        e = stats.crossed(x.mean(axis=1, keepdims=True)) if seeds_only else stats.crossed(x)
        hit += e.low <= 0.7 <= e.high
    return hit / sims


@pytest.mark.parametrize("sd_seed,sd_example,sd_noise", [
    (0.02, 0.4, 0.3),    # the evaluation sample dominates (the audit found 66-92% of the variance there)
    (0.05, 0.1, 0.3),    # the seed dominates
    (0.0, 0.3, 0.3),     # no seed effect at all
    (0.01, 0.4, 0.15),   # seeds agree on most examples
])
def test_crossed_interval_covers_at_its_nominal_level(sd_seed, sd_example, sd_noise):
    assert 0.93 <= _coverage(sd_seed, sd_example, sd_noise) <= 0.975


def test_an_interval_over_seeds_alone_undercovers_when_the_evaluation_sample_varies():
    # The published intervals before per-example records: the same data, seed means only. Seeds that
    # agree on most examples (as trained models do) leave the evaluation sample's variance out.
    assert _coverage(0.01, 0.4, 0.15, seeds_only=True) < 0.75
    assert _coverage(0.01, 0.4, 0.15) >= 0.93


def test_holm_matches_the_step_down_procedure_and_skips_untestable():
    adj = stats.holm([0.01, 0.04, 0.03, float("nan")])
    assert adj[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adj[3])


def test_zero_variance_is_untestable_not_certain():
    e = stats.crossed(np.full((3, 10), 0.01))   # the same tiny difference everywhere
    assert e.se == 0.0 and math.isnan(e.p_value) and stats.verdict(e, e.p_value) == "untested"
    assert stats.verdict(e, float("nan"), identical=True) == "identical"
    e = stats.crossed(np.array([[0.02], [0.03], [0.025]]))
    assert stats.verdict(e, e.p_value) == "win" and stats.verdict(e, 0.2) == "tie"
    assert stats.verdict(stats.crossed(-np.array([[0.02], [0.03], [0.025]])), 0.01) == "loss"


def test_mdd_is_the_power_formula():
    e = stats.crossed(np.array([[0.1], [0.2], [0.15], [0.12]]))
    assert e.mdd80 == pytest.approx((sps.t.ppf(0.975, 3) + sps.t.ppf(0.8, 3)) * e.se)


def test_vectorised_aggregates_agree_with_rliable():
    from rliable import metrics as rm
    rng = np.random.default_rng(0)
    x, y = rng.random((4, 5, 3)), rng.random((4, 5, 3))
    assert tables.iqm_rows(x.reshape(4, -1)) == pytest.approx([rm.aggregate_iqm(v) for v in x])
    y[0, :, 0] = x[0, :, 0]  # ties count one half
    assert tables.prob_improvement_rows(x, y) == pytest.approx(
        [rm.probability_of_improvement(a, b) for a, b in zip(x, y)])


# --- tables with per-example outcomes ---------------------------------------------------------

LABELS = [0, 1] * 50   # 100 eval examples, balanced; the training majority is class 1


def _record(label: str, seed: int, pred: list[int], lr: float = 1e-3, val: float | None = None,
            task: str = "rt-sentiment", method: str | None = None, steps: int = 100) -> dict:
    o = Outcomes([int(p == y) for p, y in zip(pred, LABELS)], pred, LABELS)
    return {"task": task, "label": label, "method": method or label, "seed": seed, "status": "ok",
            "metric": "accuracy", "higher_is_better": True, "score": sum(o.correct) / len(o.correct),
            "family": "baseline" if label == "head" else "lora", "train": {"steps": steps, "batch_size": 16, "lr_used": lr},
            "outcomes": o.to_record("h1"), "majority_label": 1, "trained_steps": steps, "val_score": val,
            "trainable_params": 1000, "peak_rss_mb": 500.0, "train_tokens_per_s": 100.0, "adapter_bytes": 4000,
            "loss_curve": [0.7, 0.6, 0.5]}


def _pred(acc_on_first: int, seed: int) -> list[int]:
    """Right on the first `acc_on_first` examples (give or take a seed-dependent one), wrong on the rest."""
    k = acc_on_first + (seed % 2)
    return [y if i < k else 1 - y for i, y in enumerate(LABELS)]


def test_outcomes_round_trip_compactly():
    o = Outcomes([1, 0, 1], [1, 1, 0], [1, 0, 0])
    d = o.to_record("abc")
    assert d == {"hash": "abc", "n": 3, "correct": "101", "pred": "110", "label": "100"}
    assert Outcomes.from_record(d) == o
    with pytest.raises(ValueError, match="pred has 2 entries for 3 examples"):
        Outcomes([1, 0, 1], [1, 1])


def test_per_example_intervals_baselines_flags_and_identical_rows():
    recs = []
    for s in range(3):
        recs.append(_record("lora", s, _pred(90, s)))
        recs.append(_record("dora", s, _pred(90, s)))              # LoRA's predictions exactly: flagged identical
        recs.append(_record("vera", s, [1] * 100))                   # one class: flagged, and at the majority baseline
        recs.append(_record("pissa", s, _pred(60, s)))
    rep = tables.build(recs)
    s = rep.summary.set_index("label")
    assert set(s["ci_kind"]) == {"seeds x examples"}
    x = np.array([[int(p == y) for p, y in zip(_pred(90, sd), LABELS)] for sd in range(3)], dtype=float)
    assert s.loc["lora", "score_ci95"] == pytest.approx(stats.crossed(x).ci95)
    # a seed-only interval would be far narrower here: the evaluation sample is in the interval
    assert s.loc["lora", "score_ci95"] > 3 * stats.mean_ci95(x.mean(axis=1))[1]
    assert "identical predictions to lora" in s.loc["dora", "flags"]
    assert "predicts one class (seed 0, 1, 2)" in s.loc["vera", "flags"]
    assert "at or below the majority baseline (predicts one class)" in s.loc["vera", "flags"]
    assert s.loc["pissa", "flags"] == "" and s.loc["lora", "flags"] == ""
    d = rep.paired_detail.set_index("label")
    assert d.loc["dora", "verdict"] == "identical" and d.loc["pissa", "verdict"] == "loss"
    assert d.loc["pissa", "p_holm"] >= d.loc["pissa", "p"]
    b = rep.baselines.iloc[0]
    assert b["majority"] == pytest.approx(0.5) and b["best"] == "majority"
    assert b["ref_verdict"] == "beats it" and b["ref_diff"] == pytest.approx(x.mean() - 0.5)
    notes = "\n".join(rep.notes)
    assert "Flag, rt-sentiment: predicts one class on every example: vera (seed 0, 1, 2)." in notes
    assert "the same prediction as lora on every example and seed: dora" in notes


def test_learning_rate_is_chosen_on_validation_never_on_test():
    recs = []
    for s in range(2):
        recs.append(_record("lora", s, _pred(90, s), lr=1e-3, val=0.80))
        recs.append(_record("lora", s, _pred(60, s), lr=3e-3, val=0.85))   # best on validation, worse on test
        recs.append(_record("lora", s, _pred(95, s), lr=3e-4, val=0.70))
    rep = tables.build(recs)
    chosen = rep.lr_selection[rep.lr_selection["chosen"]]
    assert list(chosen["lr"]) == [3e-3] and len(rep.lr_selection) == 3
    row = rep.summary.iloc[0]
    assert row["lr"] == 3e-3 and row["n_seeds"] == 2 and row["score"] == pytest.approx((60 + 61) / 200)
    # a grid tuned on seed 0, then the chosen rate run on more seeds: the choice compares seed 0 only
    extra = [_record("lora", s, _pred(60, s), lr=3e-3, val=0.60) for s in (2, 3)]
    rep = tables.build(recs + extra)
    assert list(rep.lr_selection[rep.lr_selection["chosen"]]["lr"]) == [3e-3]
    assert rep.summary.iloc[0]["n_seeds"] == 4
    # without validation scores nothing can be chosen: the note says so and the middle rate is reported
    for r in recs:
        r["val_score"] = None
    rep = tables.build(recs)
    assert rep.summary.iloc[0]["lr"] == 1e-3 and any("no validation score" in n for n in rep.notes)


def test_zero_shot_is_a_trivial_baseline_and_lora_below_it_is_flagged():
    recs = []
    for s in range(3):
        recs.append(_record("head", s, _pred(80, 0), task="quartz", steps=0))
        recs.append(_record("lora", s, _pred(70, s), task="quartz"))
    rep = tables.build(recs)
    b = rep.baselines.iloc[0]
    assert b["best"] == "zero-shot" and b["zero_shot"] == pytest.approx(0.8) and b["ref_verdict"] == "below it"
    assert "at or below the zero-shot baseline (trained: its loss fell" in rep.summary.set_index("label").loc["lora", "flags"]


def test_reach95_is_the_first_step_with_95_percent_of_the_gain_over_the_baseline():
    from lorabench.report.curves import reach
    curve = [(100, 0.60), (200, 0.75), (300, 0.81), (400, 0.84), (500, 0.85), (600, 0.84)]
    plateau, step = reach(curve, 0.5)
    assert plateau == pytest.approx(0.8433333) and step == 400   # target 0.5 + 0.95 * 0.3433 = 0.8262
    assert reach(curve, None) == (pytest.approx(0.8433333), 300)   # 95% of the plateau: 0.801
    assert reach([(10, 0.5), (20, 0.4)], 0.0, higher=True)[1] == 10
    assert reach([], 0.5) [1] is None


def test_validation_curves_are_tabulated_and_plotted(tmp_path):
    from lorabench.report.build import write_report
    recs = []
    for s in range(2):
        for lr, top in ((1e-3, 0.9), (3e-3, 0.7)):
            r = _record("lora", s, _pred(90, s), lr=lr, val=top)
            r["val_curve"] = [[100, 0.55], [200, top - 0.05], [300, top], [400, top]]
            recs.append(r)
    written = write_report(recs, tmp_path, ["md", "csv", "png"])
    names = {p.name for p in written}
    assert {"curves.csv", "curves-rt-sentiment.png"} <= names
    import pandas as pd
    c = pd.read_csv(tmp_path / "curves.csv")
    assert len(c) == 4 and set(c["lr"]) == {1e-3, 3e-3}   # every rate of the grid, not only the chosen one
    assert (c[c["lr"] == 1e-3]["reach95"] == 300).all()
    assert "## Validation curves" in (tmp_path / "LEADERBOARD.md").read_text()


def test_findings_rows_carry_the_power_and_a_powered_inconclusive_row_says_so():
    """Issue 15: a finding left inconclusive still counts as measured when its test would have found a 1.5-point
    difference with 80% power; the row shows that MDD, and a noisy comparison is not called powered."""
    n = 1000
    labels = [i % 2 for i in range(n)]

    def rec(label, seed, wrong):
        pred = [1 - y if i in wrong else y for i, y in enumerate(labels)]
        o = Outcomes([int(p == y) for p, y in zip(pred, labels)], pred, labels)
        return {"task": "rt-sentiment", "label": label, "method": label, "seed": seed, "status": "ok",
                "metric": "accuracy", "higher_is_better": True, "score": sum(o.correct) / n, "family": "lora",
                "train": {"steps": 100, "batch_size": 16, "lr_used": 1e-3}, "outcomes": o.to_record("h"),
                "majority_label": 1, "trained_steps": 100, "trainable_params": 1000, "peak_rss_mb": 500.0,
                "train_tokens_per_s": 100.0, "adapter_bytes": 4000, "loss_curve": [0.7, 0.6, 0.5]}

    base = {s: set(range(s, 150 + s)) for s in range(3)}          # LoRA wrong on ~15% of the examples
    tight = [rec("lora", s, base[s]) for s in range(3)]
    tight += [rec("dora", s, base[s] ^ {900 + s, 950 + s}) for s in range(3)]  # differs on 2 of 1,000: no gain
    rows = findings.evaluate(tables.build(tight).trials).set_index("claim")
    dora = rows.loc["DoRA beats LoRA at equal rank"]
    assert dora["verdict"] == "inconclusive" and 0 < dora["mdd80"] <= findings.POWERED_MDD
    assert "1 of them powered" in findings.overall(rows.reset_index(), "DoRA beats LoRA at equal rank")
    # DoRA far noisier against LoRA (hundreds of examples flip, in both directions, differently per seed): the
    # same inconclusive verdict is not powered
    rng = random.Random(0)
    noisy = [rec("lora", s, base[s]) for s in range(3)]
    noisy += [rec("dora", s, base[s] ^ set(rng.sample(range(n), 300 + 60 * s))) for s in range(3)]
    rows = findings.evaluate(tables.build(noisy).trials).set_index("claim")
    dora = rows.loc["DoRA beats LoRA at equal rank"]
    assert dora["mdd80"] > findings.POWERED_MDD
    assert "powered" not in findings.overall(rows.reset_index(), "DoRA beats LoRA at equal rank")
    table = display.findings_table(rows.reset_index())
    assert "MDD at 80% power" in table.columns
