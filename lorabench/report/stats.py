"""Statistics of a board: intervals with both sources of variance, paired tests, Holm, power.

A trial's score is a mean over evaluation examples, and a method's row is a mean over training
seeds, so a row carries two sources of variance: the seed (initialisation, data order) and the
finite evaluation sample (another 1,000 reviews would give another accuracy). Both are estimated
from the per-example outcomes the trials record, with the crossed random-effects model of a
seeds x examples table (every seed scored on the same examples):

    x[s, e] = mu + a_s + b_e + (ab)_se,   Var(mean) = s2_a / S + s2_b / n + s2_ab / (S n)

The variance components come from the two-way ANOVA mean squares (MS_seed, MS_example, MS_resid
with S - 1, n - 1 and (S - 1)(n - 1) degrees of freedom; E[MS_seed] = s2_ab + n s2_a,
E[MS_example] = s2_ab + S s2_b, E[MS_resid] = s2_ab), which gives the unbiased estimate

    Var(mean) = (MS_seed + MS_example - MS_resid) / (S n)

with Satterthwaite's degrees of freedom for that linear combination of mean squares (Searle,
Casella & McCulloch, "Variance Components", 1992, sec. 4.4). The same model applied to the
paired differences method - reference (same seed, same example) gives the paired comparison;
the example effect then cancels where both methods get an example right (or wrong) together.
`tests/test_report_stats.py` checks the interval's coverage by simulation.

Degenerate tables reduce to the textbook cases: one seed -> the example variance alone (n - 1
df), one column (records without per-example outcomes) -> Student's t over seeds (S - 1 df).
A table with no variance at all gives no interval and no test: identical differences on every
seed and example are not "certain", they are untestable (or identical predictions).

Multiplicity: the comparisons against the reference are corrected with Holm's step-down
procedure (statsmodels); the minimum detectable difference at 80% power is
(t_{0.975} + t_{0.80}) x the standard error of the paired difference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
POWER = 0.80


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error from a seeds x examples table."""
    mean: float
    se: float          # NaN when not estimable (a single value)
    df: float          # degrees of freedom of the t reference distribution
    n_seeds: int
    n_examples: int    # 1 = the table had no per-example outcomes (seed means only)
    kind: str          # "seeds x examples" | "examples only (1 seed)" | "seeds only" | "single value"

    @property
    def ci95(self) -> float:
        """Half-width of the 95% interval; NaN when it cannot be estimated, 0 when there is no variance."""
        if math.isnan(self.se) or self.df <= 0:
            return float("nan")
        return float(sps.t.ppf(1 - ALPHA / 2, self.df) * self.se)

    @property
    def low(self) -> float:
        return self.mean - self.ci95

    @property
    def high(self) -> float:
        return self.mean + self.ci95

    @property
    def p_value(self) -> float:
        """Two-sided p of the t-test of mean = 0; NaN when untestable (no variance or a single value)."""
        if math.isnan(self.se) or self.se == 0.0 or self.df <= 0:
            return float("nan")
        return float(2 * sps.t.sf(abs(self.mean) / self.se, self.df))

    @property
    def mdd80(self) -> float:
        """The smallest true difference a two-sided 5% test detects with 80% power at this standard error."""
        if math.isnan(self.se) or self.df <= 0:
            return float("nan")
        return float((sps.t.ppf(1 - ALPHA / 2, self.df) + sps.t.ppf(POWER, self.df)) * self.se)


def crossed(x) -> Estimate:
    """Mean and standard error of a seeds x examples table `x` (shape (S, n)); see the module docstring."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"crossed() needs a non-empty 2-D seeds x examples table, got shape {x.shape}")
    s, n = x.shape
    mean = float(x.mean())
    if s == 1 and n == 1:
        return Estimate(mean, float("nan"), 0.0, 1, 1, "single value")
    if np.ptp(x) <= 1e-12 * max(1.0, abs(mean)):  # constant: exactly no variance (not a rounding residue)
        kind = "seeds x examples" if s > 1 and n > 1 else ("seeds only" if n == 1 else "examples only (1 seed)")
        return Estimate(mean, 0.0, float(max(s, n) - 1), s, n, kind)
    if s == 1 or n == 1:  # one factor only: the usual variance of a mean
        v = x.ravel()
        k = v.size
        se = float(v.std(ddof=1) / math.sqrt(k))
        return Estimate(mean, se, float(k - 1), s, n, "examples only (1 seed)" if s == 1 else "seeds only")
    seed_means, ex_means = x.mean(axis=1), x.mean(axis=0)
    ms_seed = n * float(((seed_means - mean) ** 2).sum()) / (s - 1)
    ms_ex = s * float(((ex_means - mean) ** 2).sum()) / (n - 1)
    resid = x - seed_means[:, None] - ex_means[None, :] + mean
    df_r = (s - 1) * (n - 1)
    ms_res = float((resid ** 2).sum()) / df_r
    combo = ms_seed + ms_ex - ms_res
    if combo <= ms_res:  # the estimate fell below its own interaction term (sampling noise): floor it there
        var, df = ms_res / (s * n), float(df_r)
    else:
        var = combo / (s * n)
        df = combo ** 2 / (ms_seed ** 2 / (s - 1) + ms_ex ** 2 / (n - 1) + ms_res ** 2 / df_r)
    return Estimate(mean, math.sqrt(var), float(df), s, n, "seeds x examples")


def seed_interval(values) -> Estimate:
    """Student-t over seed values alone (records without per-example outcomes, or non-accuracy measures)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return Estimate(float("nan"), float("nan"), 0.0, 0, 1, "no values")
    return crossed(np.asarray(xs)[:, None])


def mean_ci95(values) -> tuple[float, float, int]:
    """(mean, half-width of the 95% Student-t interval over seeds, n); half-width NaN for n < 2."""
    e = seed_interval(values)
    return e.mean, e.ci95, e.n_seeds


def holm(p_values) -> list[float]:
    """Holm-adjusted p-values (NaN entries stay NaN and do not count as tests)."""
    from statsmodels.stats.multitest import multipletests
    p = np.asarray(list(p_values), dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], alpha=ALPHA, method="holm")[1]
    return [float(v) for v in out]


def verdict(e: Estimate, p_adjusted: float, identical: bool = False) -> str:
    """'win' / 'loss' when the (corrected) test rejects equality at the 5% level, 'tie' when it does not;
    'identical' for the same predictions everywhere; 'untested' when nothing varies or too little data."""
    if identical:
        return "identical"
    if math.isnan(p_adjusted):
        return "untested"
    if p_adjusted < ALPHA:
        return "win" if e.mean > 0 else "loss"
    return "tie"
