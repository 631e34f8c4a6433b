"""Statistics over seeds: mean +- sample standard deviation, Welch's t-test of a variant against the baseline, and
a paired t-test over the seeds both ran.

Welch's test (unequal variances) compares the two seed means: difference d = mean_b - mean_a, standard error
se = sqrt(s_a^2 / n_a + s_b^2 / n_b), t = d / se, degrees of freedom by Welch-Satterthwaite
df = se^4 / ((s_a^2 / n_a)^2 / (n_a - 1) + (s_b^2 / n_b)^2 / (n_b - 1)); the 95% interval of d is
d +- t_{0.975, df} x se and p is two-sided. It needs at least 2 seeds on both sides and some spread; otherwise the
comparison is reported as not available rather than as an exact difference. With 2 or 3 seeds df is small and the
interval wide: that is what the seeds say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from scipy import stats as _scipy_stats


def fmt(x: float, digits: int = 4, sign: bool = False) -> str:
    """Fixed-point with `digits` decimals; values too small to show that way (an auxiliary loss of 1e-5) in
    scientific notation instead of as 0.0000."""
    plus = "+" if sign else ""
    if digits > 0 and x != 0 and abs(x) < 0.5 * 10 ** -digits:
        return f"{x:{plus}.{max(digits - 2, 1)}e}"
    return f"{x:{plus}.{digits}f}"


def mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    """(mean, sample std with n - 1); std is None for one value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    m = sum(values) / n
    if n == 1:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


@dataclass
class Welch:
    """The difference of means (b - a) with its Welch interval, or why there is none (`na`)."""

    diff: float
    lo: Optional[float] = None
    hi: Optional[float] = None
    p: Optional[float] = None
    df: Optional[float] = None
    t: Optional[float] = None
    na: str = ""  # reason the test is not available ("1 seed", "no spread")

    def text(self, digits: int = 4) -> str:
        d = fmt(self.diff, digits, sign=True)
        if self.na:
            return f"{d} (n/a: {self.na})"
        return f"{d} [{fmt(self.lo, digits, True)}, {fmt(self.hi, digits, True)}] p={self.p:.3f}"


def welch(a: list[float], b: list[float], level: float = 0.95) -> Welch:
    """Welch's t-test of mean(b) - mean(a) (see the module docstring)."""
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    diff = mb - ma
    if sa is None or sb is None:
        return Welch(diff, na=f"{min(len(a), len(b))} seed")
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Welch(diff, na="no spread between seeds")
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    t = diff / se
    q = t_quantile(level, df)
    p = float(2 * _scipy_stats.t.sf(abs(t), df))
    return Welch(diff, diff - q * se, diff + q * se, p, df, t)


def paired(a: dict, b: dict, level: float = 0.95) -> Welch:
    """Paired t-test over the seeds both sides ran ({seed: value}): the mean of b[s] - a[s], its 95% interval
    (t with n - 1 degrees of freedom) and two-sided p. Same seed means the same initialisation and data order, so
    the seed-to-seed noise the two variants share cancels."""
    seeds = sorted(set(a) & set(b))
    d = [b[s] - a[s] for s in seeds]
    if not d:
        return Welch(math.nan, na="no common seed")
    m, s = mean_std(d)
    if s is None:
        return Welch(m, na="1 common seed")
    if s == 0:
        return Welch(m, na="no spread between seeds")
    n = len(d)
    se = s / math.sqrt(n)
    q = t_quantile(level, n - 1)
    t = m / se
    return Welch(m, m - q * se, m + q * se, float(2 * _scipy_stats.t.sf(abs(t), n - 1)), float(n - 1), t)


def t_quantile(level: float, df: float) -> float:
    """The two-sided `level` quantile of Student's t with `df` degrees of freedom (1.96-like for large df)."""
    return float(_scipy_stats.t.ppf(0.5 + level / 2, df))
