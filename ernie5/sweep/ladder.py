"""Scaling ladder: fit loss against training compute with a power law, L(C) = a * C^(-b).

The fit is ordinary least squares of log L on log C (log L = log a - b log C). With three or four sizes a pure
power law is the honest model: an irreducible-loss term (L = E + a C^-b) has three parameters and would pass
exactly through three points, leaving nothing to judge the fit or the interval by. The 95% interval of b is
b +- t_{0.975, n-2} x SE(b), SE(b) = s / sqrt(Sxx) with s^2 the residual variance (n - 2 degrees of freedom) and
Sxx = sum (log C - mean log C)^2. The predicted loss at a compute C* comes with the regression's 95% prediction
interval in log space, s x sqrt(1 + 1/n + (log C* - mean log C)^2 / Sxx), mapped back with exp.

The next size up: the sweep file's `ladder.next` overrides applied on top of the last rung's resolved config give
its planner FLOPs per token and its tokens (the same as the last rung's unless `next` changes the batch or
steps); without `ladder.next` it is one more step of the ladder's own ratio, C_next = C_last^2 / C_previous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ernie5.sweep.stats import t_quantile


@dataclass
class PowerLawFit:
    """L(C) = a * C^(-b), fitted in log-log space to n points."""

    a: float
    b: float
    n: int
    b_lo: Optional[float] = None  # 95% interval of b (None with n = 2: no residual degrees of freedom)
    b_hi: Optional[float] = None
    se_b: Optional[float] = None
    r2: float = 1.0
    mean_x: float = 0.0  # mean of log C
    sxx: float = 0.0
    s: Optional[float] = None  # residual standard deviation in log L

    def predict(self, compute: float) -> float:
        return self.a * compute ** (-self.b)

    def predict_interval(self, compute: float, level: float = 0.95) -> Optional[tuple[float, float]]:
        """95% prediction interval of the loss at `compute` (None without residual degrees of freedom)."""
        if self.s is None:
            return None
        x0 = math.log(compute)
        half = t_quantile(level, self.n - 2) * self.s * math.sqrt(1 + 1 / self.n + (x0 - self.mean_x) ** 2 / self.sxx)
        centre = math.log(self.predict(compute))
        return math.exp(centre - half), math.exp(centre + half)


def fit_power_law(compute: list[float], loss: list[float], level: float = 0.95) -> PowerLawFit:
    """Least squares of log(loss) on log(compute). Needs >= 2 points with distinct compute, all positive."""
    x = np.log(np.asarray(compute, dtype=np.float64))
    y = np.log(np.asarray(loss, dtype=np.float64))
    n = x.size
    if n < 2 or y.size != n:
        raise ValueError(f"a power-law fit needs >= 2 (compute, loss) pairs, got {n}")
    mx, my = float(x.mean()), float(y.mean())
    sxx = float(((x - mx) ** 2).sum())
    if sxx == 0:
        raise ValueError("a power-law fit needs at least two different compute values")
    slope = float(((x - mx) * (y - my)).sum() / sxx)
    intercept = my - slope * mx
    resid = y - (intercept + slope * x)
    ss_res, ss_tot = float((resid ** 2).sum()), float(((y - my) ** 2).sum())
    fit = PowerLawFit(a=math.exp(intercept), b=-slope, n=n, r2=1 - ss_res / ss_tot if ss_tot > 0 else 1.0,
                      mean_x=mx, sxx=sxx)
    if n > 2:
        fit.s = math.sqrt(ss_res / (n - 2))
        fit.se_b = fit.s / math.sqrt(sxx)
        q = t_quantile(level, n - 2)
        fit.b_lo, fit.b_hi = fit.b - q * fit.se_b, fit.b + q * fit.se_b
    return fit


def next_compute_by_ratio(computes: list[float]) -> float:
    """One more rung at the ladder's last ratio: C_last^2 / C_previous."""
    if len(computes) < 2:
        raise ValueError("extrapolating the ladder's ratio needs >= 2 rungs")
    return computes[-1] ** 2 / computes[-2]
