"""The power-law fit recovers a known exponent from synthetic points, and the ladder section of a report fits the
planner's compute of fabricated runs."""

import json
import math

import numpy as np
import pytest

from ernie5.sweep.ladder import fit_power_law, next_compute_by_ratio
from ernie5.sweep.collect import read_run
from ernie5.sweep.report import LadderOptions, compare
from tests.sweep.helpers import fabricate_run


def test_exact_power_law_is_recovered():
    C = [1e12, 1e13, 1e14, 1e15]
    fit = fit_power_law(C, [30.0 * c ** -0.05 for c in C])
    assert fit.b == pytest.approx(0.05, abs=1e-12) and fit.a == pytest.approx(30.0, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0) and fit.se_b == pytest.approx(0.0, abs=1e-12)
    assert fit.predict(1e16) == pytest.approx(30.0 * 1e16 ** -0.05)


def test_noisy_points_recover_the_exponent_within_its_interval():
    """8 sizes, 1% multiplicative noise (seeded): b within 0.01 of the truth and inside the 95% interval."""
    rng = np.random.default_rng(0)
    C = np.geomspace(1e11, 1e15, 8)
    L = 40.0 * C ** -0.08 * np.exp(rng.normal(0, 0.01, C.size))
    fit = fit_power_law(C.tolist(), L.tolist())
    assert abs(fit.b - 0.08) < 0.01
    assert fit.b_lo < 0.08 < fit.b_hi
    lo, hi = fit.predict_interval(1e16)
    assert lo < fit.predict(1e16) < hi


def test_three_points_interval_uses_one_degree_of_freedom():
    C, L = [1e12, 1e13, 1e14], [5.0, 4.1, 3.5]
    fit = fit_power_law(C, L)
    x, y = np.log(C), np.log(L)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    se = math.sqrt((resid ** 2).sum() / 1) / math.sqrt(((x - x.mean()) ** 2).sum())
    assert fit.b == pytest.approx(-slope) and fit.se_b == pytest.approx(se)
    assert fit.b_hi - fit.b == pytest.approx(12.7062047 * se, rel=1e-6)  # t_{0.975, 1}
    with pytest.raises(ValueError):
        fit_power_law([1e12, 1e12], [3.0, 2.0])
    assert fit_power_law([1e12, 1e13], [3.0, 2.0]).b_lo is None  # 2 points: exact, no interval


def test_next_compute_by_ratio():
    assert next_compute_by_ratio([1e12, 4e12, 1.6e13]) == pytest.approx(6.4e13)


@pytest.mark.parametrize("next_overrides", [None, ["model.hidden_size=64", "model.num_layers=3"]])
def test_ladder_report_recovers_the_exponent(tmp_path, next_overrides):
    """Three sizes whose held-out loss is exactly 20 * C^-0.1 for the planner's compute: the report fits b = 0.1
    and predicts the next size on the same law."""
    sizes = [["model.hidden_size=16"], ["model.hidden_size=32"], ["model.hidden_size=48"]]
    runs = []
    for i, extra in enumerate(sizes):
        d = fabricate_run(tmp_path / f"h{i}" / "seed1", f"h{i}", 1, [{"step": 3, "loss": 1.0}], extra=extra)
        C = read_run(d).compute
        (d / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0, "val_loss": 20 * C ** -0.1}) + "\n")
        runs.append(str(d))
    text = compare(runs, tmp_path / "cmp", ladder=LadderOptions(next=next_overrides)).read_text()
    s = json.loads((tmp_path / "cmp" / "report.json").read_text())["ladder"]
    assert s["b"] == pytest.approx(0.1, abs=1e-9) and s["a"] == pytest.approx(20.0, rel=1e-6)
    assert "**b = 0.1000**, 95% interval [0.1000, 0.1000] (t with 1 degree of freedom" in text
    assert s["next_loss"] == pytest.approx(20 * s["next_compute"] ** -0.1, rel=1e-9)
    if next_overrides is None:
        assert s["next_compute"] == pytest.approx(s["compute"][2] ** 2 / s["compute"][1])
        assert "one more step of the ladder's last compute ratio" in text
    else:
        assert "`ladder.next` (model.hidden_size=64, model.num_layers=3) on top of `h2`" in text
        assert s["next_compute"] > s["compute"][2]
    assert (tmp_path / "cmp" / "ladder_fit.png").is_file()
