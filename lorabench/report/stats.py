"""Statistics over seeds: Student-t confidence intervals, the paired t-test and the exact sign test.

Seeds are few (3 in the standard suite), so every interval uses Student's t quantile for n - 1
degrees of freedom, never the normal 1.96. scipy is not a dependency: the two-sided 97.5% t
quantiles are tabulated below (values from any t table), and the sign test's binomial tail is
computed exactly with integer arithmetic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Two-sided 95% Student-t quantiles t_{0.975, df}.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
        18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    """t_{0.975, df}; between tabulated degrees of freedom the next smaller df's value (conservative)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    if df > 120:
        return 1.960
    return T975[max(k for k in T975 if k <= df)]


def mean_ci95(values) -> tuple[float, float, int]:
    """(mean, half-width of the 95% Student-t interval, n) of the finite values; half-width NaN for n < 2."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = math.fsum(xs) / n
    if n < 2:
        return mean, float("nan"), n
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, t975(n - 1) * math.sqrt(var) / math.sqrt(n), n


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test p-value (ties dropped): P(|B - n/2| >= |wins - n/2|), B ~ Bin(n, 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)


@dataclass(frozen=True)
class Paired:
    """A paired comparison over seeds of `diffs` = (method - reference), oriented so positive = better."""
    n: int
    mean: float
    ci95: float        # half-width; NaN when n < 2

    @property
    def low(self) -> float:
        return self.mean - self.ci95

    @property
    def high(self) -> float:
        return self.mean + self.ci95

    def verdict(self) -> str:
        """'win' / 'loss' when the paired t-test rejects equality at the 5% level (the 95% CI of the
        mean difference excludes 0), 'tie' when it does not, 'untested' with fewer than 2 pairs."""
        if self.n < 2 or math.isnan(self.ci95):
            return "untested"
        if self.ci95 == 0.0:  # identical differences on every seed: the sign is certain
            return "win" if self.mean > 0 else "loss" if self.mean < 0 else "tie"
        if self.low > 0:
            return "win"
        if self.high < 0:
            return "loss"
        return "tie"


def paired(diffs) -> Paired:
    mean, hw, n = mean_ci95(diffs)
    return Paired(n=n, mean=mean, ci95=hw)
