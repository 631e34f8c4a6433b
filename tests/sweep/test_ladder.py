"""The power-law fit recovers a known exponent from synthetic points, and the ladder section of a report fits the
planner's compute of fabricated runs."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from ernie5.plan import flops_per_token
from ernie5.runconfig import load_config
from ernie5.sweep.ladder import fit_power_law, next_compute_by_ratio
from ernie5.sweep.report import LadderOptions, compare
from tests.sweep.helpers import TINY, fabricate_run


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


SIZES = {"h0": ["model.hidden_size=16"], "h1": ["model.hidden_size=32"], "h2": ["model.hidden_size=48"]}
NEXT = ["model.hidden_size=64", "model.num_layers=3"]


def planned_compute(extra: list[str]) -> float:
    """Training compute by hand: the planner's FLOPs per token for TINY + `extra`, x 3 steps x micro-batch 2 x
    1 accumulation step x 32 tokens per row (TINY's data.seq_len)."""
    cfg = load_config(None, TINY + ["train.max_steps=3"] + extra)
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.data.seq_len) == (2, 1, 32)
    return flops_per_token(cfg.model, 32) * 3 * 2 * 1 * 32


def ladder_runs(root, sizes=SIZES) -> list[str]:
    """One seed per size whose final held-out loss is exactly 20 * C^-0.1 for the hand-computed compute."""
    runs = []
    for name, extra in sizes.items():
        val = 20 * planned_compute(extra) ** -0.1
        runs.append(str(fabricate_run(root / name / "seed1", name, 1, [{"step": 3, "loss": 1.0, "val_loss": val}],
                                      extra=extra)))
    return runs


@pytest.mark.parametrize("next_overrides", [None, NEXT])
def test_ladder_report_recovers_the_exponent(tmp_path, next_overrides):
    """Three sizes whose held-out loss is exactly 20 * C^-0.1 for the planner's compute: the report fits b = 0.1
    and predicts the next size on the same law, at the compute computed by hand."""
    runs = ladder_runs(tmp_path)
    C = [planned_compute(extra) for extra in SIZES.values()]
    text = compare(runs, tmp_path / "cmp", ladder=LadderOptions(next=next_overrides)).read_text()
    s = json.loads((tmp_path / "cmp" / "report.json").read_text())["ladder"]
    assert s["compute"] == [pytest.approx(c, rel=1e-12) for c in C]
    assert s["b"] == pytest.approx(0.1, abs=1e-9) and s["a"] == pytest.approx(20.0, rel=1e-6)
    assert "**b = 0.1000**, 95% interval [0.1000, 0.1000] (t with 1 degree of freedom" in text
    if next_overrides is None:
        c_next = C[2] ** 2 / C[1]
        assert "one more step of the ladder's last compute ratio" in text
    else:
        c_next = planned_compute(SIZES["h2"] + NEXT)  # `next` on top of the last rung
        assert "`ladder.next` (model.hidden_size=64, model.num_layers=3) on top of `h2`" in text
    pred = 20 * c_next ** -0.1
    assert s["next_compute"] == pytest.approx(c_next, rel=1e-12) and s["next_loss"] == pytest.approx(pred, rel=1e-9)
    assert f"C = {c_next:.4g} FLOPs -> predicted held-out loss {pred:.4f}" in text
    assert (tmp_path / "cmp" / "ladder_fit.png").is_file()


def write_sweep_json(sweep_dir, runs: list[str], variants: list[str], nxt) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(json.dumps({
        "name": "ladder", "sweep_file": "ladder.yaml", "variants": variants,
        "ladder": {"next": nxt}, "runs": [os.path.relpath(r, sweep_dir) for r in runs]}))


def test_sweep_ladder_next_applies_with_and_without_the_flag(tmp_path):
    """`ernie5 compare SWEEPDIR --ladder` (LadderOptions() from the CLI) predicts with the sweep's `ladder.next`,
    the same as without the flag."""
    runs = ladder_runs(tmp_path / "out")
    write_sweep_json(tmp_path / "out", runs, list(SIZES), NEXT)
    c_next = planned_compute(SIZES["h2"] + NEXT)
    for i, opts in enumerate([None, LadderOptions()]):
        text = compare([str(tmp_path / "out")], tmp_path / f"cmp{i}", ladder=opts).read_text()
        s = json.loads((tmp_path / f"cmp{i}" / "report.json").read_text())["ladder"]
        assert s["next_compute"] == pytest.approx(c_next, rel=1e-12), opts
        assert "`ladder.next` (model.hidden_size=64, model.num_layers=3) on top of `h2`" in text


def test_no_prediction_when_a_rung_did_not_finish(tmp_path):
    """The last declared rung failed: `ladder.next` would land on top of the wrong rung, so the report fits the
    finished rungs and says there is no prediction."""
    sizes = {**SIZES, "h3": ["model.hidden_size=64"]}
    runs = ladder_runs(tmp_path / "out", sizes)
    marker = Path(runs[3]) / "sweep_run.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "status": "failed"}))
    write_sweep_json(tmp_path / "out", runs, list(sizes), NEXT)
    text = compare([str(tmp_path / "out")], tmp_path / "cmp").read_text()
    s = json.loads((tmp_path / "cmp" / "report.json").read_text())["ladder"]
    assert s["compute"] == [pytest.approx(planned_compute(e), rel=1e-12) for e in SIZES.values()]  # h0..h2
    assert s["next_compute"] is None and s["next_loss"] is None and s["missing_rungs"] == ["h3"]
    assert "Next size up: no prediction: rung(s) `h3` have no finished run" in text
    assert "predicted" not in text and f"left out {runs[3]}: not finished (failed)" in text
