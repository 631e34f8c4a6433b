"""`ernie5 compare` on fabricated run directories: the statistics match a hand computation, routing is shown side
by side, and the same runs give the same report."""

import json
import math

import pytest
from scipy import stats

from ernie5.analysis.routing import normalised_entropy
from ernie5.errors import UserError
from ernie5.sweep.collect import final_heldout, final_train, read_run
from ernie5.sweep.report import compare
from ernie5.sweep.stats import mean_std, welch
from tests.conftest import run_cli
from tests.sweep.helpers import fabricate_run, write_elastic_eval


def records(losses, val, tps=(100.0, 300.0, 200.0, 250.0)):
    """Steps 1..4 (fabricate_run makes train.max_steps 4: finished runs); held-out evaluations at steps 2 (a decoy)
    and 4 (the final one), per source too."""
    out = []
    for i, (loss, t) in enumerate(zip(losses, tps), 1):
        r = {"step": i, "loss": loss, "loss_text": loss / 2, "tokens_per_s": t}
        if i in (2, 4):
            v = val if i == 4 else 99.0
            r.update({"val_loss": v, "val_loss/src_a": v - 0.5, "val_loss/src_b": v + 0.5})
        out.append(r)
    return out


ROUTING = [{"step": 4, "load": [[10, 1, 1, 10]],
            "load_by_modality": {"text": [[10, 1, 0, 0]], "image": [[0, 0, 1, 10]]}}]


@pytest.fixture
def runs(tmp_path):
    dirs = [
        fabricate_run(tmp_path / "base" / "seed1", "base", 1, records([5.0, 4.0, 3.0, 2.0], 2.0), routing=ROUTING),
        fabricate_run(tmp_path / "base" / "seed2", "base", 2, records([5.0, 4.2, 3.2, 2.2], 2.2), routing=ROUTING),
        fabricate_run(tmp_path / "alt" / "seed3", "alt", 3, records([5.0, 4.0, 3.0, 2.5], 2.0), routing=ROUTING),
        fabricate_run(tmp_path / "alt" / "seed1", "alt", 1, records([5.0, 4.0, 3.0, 2.0], 1.8), routing=ROUTING),
        fabricate_run(tmp_path / "alt" / "seed2", "alt", 2, records([5.0, 4.0, 3.0, 2.0], 1.9), routing=ROUTING),
    ]
    return [str(d) for d in dirs]


def test_final_values():
    recs = records([5.0, 4.0, 3.0, 2.0], 2.0)
    assert final_train(recs) == {"loss": 3.0, "loss_text": 1.5}  # mean of the last 3 logged values
    assert final_train(recs, tail=1) == {"loss": 2.0, "loss_text": 1.0}
    assert final_heldout(recs) == {"val_loss": 2.0, "val_loss/src_a": 1.5, "val_loss/src_b": 2.5}
    assert final_heldout([{"step": 1, "loss": 3.0}]) == {}


def test_welch_against_hand_computation():
    a, b = [2.0, 2.2], [1.8, 1.9, 2.0]
    # by hand: means 2.1 and 1.9; variances 0.02 and 0.01; se^2 = 0.02/2 + 0.01/3
    va, vb = 0.01, 0.01 / 3
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 1 + vb ** 2 / 2)
    assert df == pytest.approx(1.6842105, rel=1e-6)
    w = welch(a, b)
    assert w.diff == pytest.approx(-0.2) and w.df == pytest.approx(df) and w.t == pytest.approx(-0.2 / se)
    q = stats.t.ppf(0.975, df)
    assert (w.lo, w.hi) == (pytest.approx(-0.2 - q * se), pytest.approx(-0.2 + q * se))
    assert w.p == pytest.approx(2 * stats.t.sf(0.2 / se, df))
    ref = stats.ttest_ind(b, a, equal_var=False)  # scipy's own Welch test agrees
    assert w.t == pytest.approx(ref.statistic) and w.p == pytest.approx(ref.pvalue)
    assert mean_std([2.0, 2.2]) == (pytest.approx(2.1), pytest.approx(math.sqrt(0.02)))
    assert welch([1.0], [2.0, 3.0]).text() == "+1.5000 (n/a: 1 seed)"
    assert welch([1.0, 1.0], [2.0, 2.0]).na == "no spread between seeds"


def test_report_numbers(tmp_path, runs):
    path = compare(runs, tmp_path / "cmp")
    text = path.read_text()
    # baseline held-out [2.0, 2.2]; alt [1.8, 1.9, 2.0] (seeds sorted 1, 2, 3)
    w = welch([2.0, 2.2], [1.8, 1.9, 2.0])
    se = math.sqrt(0.01 + 0.01 / 3)
    assert w.text() == f"-0.2000 [{-0.2 - stats.t.ppf(0.975, w.df) * se:+.4f}, " \
                       f"{-0.2 + stats.t.ppf(0.975, w.df) * se:+.4f}] p={w.p:.3f}"
    base_row = next(ln for ln in text.splitlines() if ln.startswith("| base | 1, 2 |"))
    alt_row = next(ln for ln in text.splitlines() if ln.startswith("| alt | 1, 2, 3 |"))
    # train: base [mean(4,3,2), mean(4.2,3.2,2.2)] = [3.0, 3.2]; alt [3.0, 3.0, mean(4,3,2.5) = 3.1667]
    assert f"| {3.1:.4f} ± {math.sqrt(0.02):.4f} | {2.1:.4f} ± {math.sqrt(0.02):.4f} | baseline |" in base_row
    alt_train = mean_std([3.0, 3.0, 9.5 / 3])
    assert f"| {alt_train[0]:.4f} ± {alt_train[1]:.4f} | 1.9000 ± 0.1000 | {w.text()} |" in alt_row
    assert "| 225 ± 0 |" in alt_row  # median tokens/s of each run is 225
    # per source: src_a = val - 0.5
    assert "| alt | 1.9000 ± 0.1000 | 1.4000 ± 0.1000 | 2.4000 ± 0.1000 |" in text
    assert "| alt | held-out src_a | " + welch([1.5, 1.7], [1.3, 1.4, 1.5]).text() + " |" in text
    # routing: text on expert 0, image on expert 3 -> disjoint top sets
    ent_text = normalised_entropy([[10, 1, 0, 0]])[0]
    assert f"| base | {ent_text:.3f} ± 0.000 |" in text and "IoU text/image" in text
    assert text.count(" 0.000 ± 0.000 |") >= 2  # IoU 0 in both variants' rows
    summary = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert summary["variants"] == ["base", "alt"]
    assert [(r["variant"], r["seed"]) for r in summary["runs"]] == [("base", 1), ("base", 2), ("alt", 3), ("alt", 1),
                                                                  ("alt", 2)]  # the order given
    assert (tmp_path / "cmp" / "loss_curves.png").is_file() and (tmp_path / "cmp" / "heldout_curves.png").is_file()
    # the runs table: every run finished its 4 steps; last train loss, final held-out loss, median tokens/s, wall s
    table = [ln for ln in text.split("## Runs")[1].split("\n## ")[0].splitlines() if ln.startswith("|")]
    assert table[0] == "| variant | seed | run dir | steps | train loss | held-out loss | tokens/s | wall s |"
    rows = [("base", 1, runs[0], 3.0, 2.0), ("base", 2, runs[1], 3.2, 2.2), ("alt", 3, runs[2], 9.5 / 3, 2.0),
            ("alt", 1, runs[3], 3.0, 1.8), ("alt", 2, runs[4], 3.0, 1.9)]
    assert table[2:] == [f"| {v} | {seed} | `{d}` | 4 | {last:.4f} | {val:.4f} | 225 | 1 |"
                         for v, seed, d, last, val in rows]
    assert "unfinished" not in text


def test_report_is_deterministic(tmp_path, runs):
    a = compare(runs, tmp_path / "a").read_text()
    b = compare(runs, tmp_path / "b").read_text()
    assert a == b
    assert (tmp_path / "a" / "report.json").read_text() == (tmp_path / "b" / "report.json").read_text()


def test_sweep_dir_leaves_out_unfinished_runs(tmp_path, runs):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    unfinished = fabricate_run(tmp_path / "alt" / "seed9", "alt", 9, records([5.0, 4.0, 3.0, 2.0], 1.0))
    marker = json.loads((unfinished / "sweep_run.json").read_text())
    (unfinished / "sweep_run.json").write_text(json.dumps({**marker, "status": "failed"}))
    (sweep_dir / "sweep.json").write_text(json.dumps({"name": "t", "sweep_file": "t.yaml", "ladder": None,
                                                      "runs": runs + [str(unfinished)]}))
    text = compare([str(sweep_dir)], sweep_dir).read_text()
    assert f"left out {unfinished}: not finished (failed)" in text and "| alt | 1, 2, 3 |" in text


def test_plain_run_dirs_leave_out_unfinished_runs(tmp_path, runs):
    """An unfinished run given as a plain run dir is left out of the statistics, as a sweep dir leaves it out: a
    note says so and the runs table lists it as unfinished."""
    unfinished = fabricate_run(tmp_path / "alt" / "seed9", "alt", 9, records([5.0, 0.0], 0.1),
                               extra=["train.max_steps=4"])  # stopped after step 2 of 4
    text = compare(runs + [str(unfinished)], tmp_path / "cmp").read_text()
    assert compare(runs, tmp_path / "ref").read_text().split("## Final losses")[1].split("## Curves")[0] == \
        text.split("## Final losses")[1].split("## Curves")[0]  # the same statistics as without it
    assert f"- left out {unfinished}: not finished (step 2 of 4)" in text
    assert f"| alt | 9 | `{unfinished}` | 2 of 4 (unfinished, left out) | 2.5000 | 99.0000 |" in text
    assert "2 variant(s), 5 run(s)" in text
    summary = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert [r["seed"] for r in summary["runs"]] == [1, 2, 3, 1, 2]
    with pytest.raises(UserError, match="no finished runs to compare"):
        compare([str(unfinished)], tmp_path / "none")


@pytest.mark.parametrize("body, reason", [
    ('{"name": "t", "sweep_file": "t.yaml", "runs": ["a/seed1"', "JSONDecodeError"),  # truncated
    ('{"name": "t", "runs": []}', "KeyError: 'sweep_file'"),
    ('{"name": "t", "sweep_file": "t.yaml", "runs": "a/seed1"}', "TypeError"),
    ('{"name": "t", "sweep_file": "t.yaml", "runs": [1, 2]}', "TypeError"),
    ('["not", "a", "mapping"]', "TypeError"),
    ('{"name": "t", "sweep_file": "t.yaml", "runs": [], "ladder": [1]}', "AttributeError"),
])
def test_bad_sweep_json_is_a_user_error(tmp_path, body, reason):
    (tmp_path / "sweep.json").write_text(body)
    with pytest.raises(UserError) as e:
        compare([str(tmp_path)], tmp_path / "cmp")
    assert e.value.where == str(tmp_path / "sweep.json") and e.value.reason.startswith(f"unreadable ({reason}")


def test_bad_sweep_json_cli_is_one_line_exit_2(tmp_path):
    (tmp_path / "sweep.json").write_text('{"name": "t", "sweep_')
    r = run_cli("compare", str(tmp_path), "--out", str(tmp_path / "c"), timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: {tmp_path / 'sweep.json'}: unreadable (JSONDecodeError")


def test_run_reads_planner_sizes(tmp_path, runs):
    r = read_run(runs[0])
    from ernie5.plan import count_parameters, flops_per_token
    from ernie5.sweep.collect import read_config

    cfg = read_config(tmp_path / "base" / "seed1")
    assert r.total_params == count_parameters(cfg.model).total_params
    assert r.compute == flops_per_token(cfg.model, 32) * 4 * 2 * 32  # 4 steps x 2 rows x 32 tokens


def test_compare_cli(tmp_path, runs):
    r = run_cli("compare", *runs[:2], "--out", str(tmp_path / "c"), timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "c" / "report.md"), r.stderr
    bad = run_cli("compare", str(tmp_path), "--out", str(tmp_path / "d"), timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {tmp_path}: neither a run directory (metrics.jsonl) nor a sweep directory (sweep.json)"]


def test_duplicate_seed_is_refused(tmp_path, runs):
    dup = fabricate_run(tmp_path / "again", "base", 1, records([5.0, 4.0, 3.0, 2.0], 2.0))
    with pytest.raises(UserError, match="same seed"):
        compare(runs + [str(dup)], tmp_path / "x")


def test_paired_against_hand_computation(tmp_path, runs):
    from ernie5.sweep.stats import paired

    # per-seed differences alt - base on held-out: seed 1: 1.8 - 2.0 = -0.2, seed 2: 1.9 - 2.2 = -0.3 (seed 3: no pair)
    w = paired({1: 2.0, 2: 2.2}, {1: 1.8, 2: 1.9, 3: 2.0})
    d_mean, d_sd = -0.25, math.sqrt(((0.05) ** 2 * 2) / 1)
    se = d_sd / math.sqrt(2)
    q = stats.t.ppf(0.975, 1)
    assert w.diff == pytest.approx(d_mean) and w.df == 1
    assert (w.lo, w.hi) == (pytest.approx(d_mean - q * se), pytest.approx(d_mean + q * se))
    ref = stats.ttest_rel([1.8, 1.9], [2.0, 2.2])
    assert w.t == pytest.approx(ref.statistic) and w.p == pytest.approx(ref.pvalue)
    assert paired({1: 1.0}, {2: 1.0}).na == "no common seed" and paired({1: 1.0}, {1: 2.0}).na == "1 common seed"
    text = compare(runs, tmp_path / "cmp").read_text()
    assert f"| alt | held-out loss | {welch([2.0, 2.2], [1.8, 1.9, 2.0]).text()} | {w.text()} |" in text


# held-out loss per sub-model: variant -> seed -> [full, depth=2, top_k=1] (the grid's order, not alphabetical)
ELASTIC = {"non_elastic": {1234: [5.00, 5.60, 5.30], 4321: [5.20, 5.90, 5.40]},
           "elastic": {1234: [5.10, 5.20, 5.25], 4321: [5.20, 5.40, 5.47]}}
SUBS = ["full", "depth=2", "top_k=1"]
ACTIVE = {"full": 30000, "depth=2": 24000, "top_k=1": 27000}


def test_elastic_submodels_table(tmp_path):
    """2 variants x 2 seeds x 3 sub-models: every cell against a hand computation."""
    dirs = []
    for variant, seeds in ELASTIC.items():
        for seed, losses in seeds.items():
            d = fabricate_run(tmp_path / variant / f"seed{seed}", variant, seed, records([5.0, 4.0, 3.0, 2.0], 2.0))
            write_elastic_eval(d, dict(zip(SUBS, losses)), ACTIVE, batches=64, max_steps=4)
            dirs.append(str(d))
    text = compare(dirs, tmp_path / "cmp").read_text()
    assert "## Elastic sub-models" in text and "same 64 held-out micro-batches" in text
    section = text.split("## Elastic sub-models")[1].split("\n## ")[0]
    table = [ln for ln in section.splitlines() if ln.startswith("|")]
    assert table[0] == ("| sub-model | active params | non_elastic | elastic | Δ elastic vs non_elastic (Welch) "
                        "[95% CI] p | Δ elastic (paired by seed) [95% CI] p |")
    assert [ln.split(" | ")[0] for ln in table[2:]] == ["| `full`", "| `depth=2`", "| `top_k=1`"]

    def welch_text(a, b):  # by hand: d = mean b - mean a, se^2 = s_a^2/2 + s_b^2/2, Welch-Satterthwaite df
        va, vb = stats.tvar(a) / 2, stats.tvar(b) / 2
        d, se = sum(b) / 2 - sum(a) / 2, math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va ** 2 + vb ** 2)
        q, p = stats.t.ppf(0.975, df), 2 * stats.t.sf(abs(d) / se, df)
        return f"{d:+.4f} [{d - q * se:+.4f}, {d + q * se:+.4f}] p={p:.3f}"

    # full: non_elastic 5.10 ± sqrt(0.02), elastic 5.15 ± sqrt(0.005); per-seed differences +0.10, 0.00:
    # mean +0.05, sd sqrt(0.005), se 0.05, t = 1 with 1 df: p = 0.5, interval 0.05 ± 12.7062 x 0.05
    assert table[2] == (f"| `full` | 30,000 | 5.1000 ± 0.1414 | 5.1500 ± 0.0707 | "
                        f"{welch_text([5.0, 5.2], [5.1, 5.2])} | +0.0500 [-0.5853, +0.6853] p=0.500 |")
    # depth=2: 5.75 ± sqrt(0.045), 5.30 ± sqrt(0.02); differences -0.40, -0.50: mean -0.45, se 0.05, t = -9
    p9 = 2 * stats.t.sf(9, 1)
    assert table[3] == (f"| `depth=2` | 24,000 | 5.7500 ± 0.2121 | 5.3000 ± 0.1414 | "
                        f"{welch_text([5.6, 5.9], [5.2, 5.4])} | -0.4500 [-1.0853, +0.1853] p={p9:.3f} |")
    # top_k=1: 5.35 ± sqrt(0.005), 5.36 ± sqrt(0.0242); differences -0.05, +0.07: mean +0.01, sd sqrt(0.0072),
    # se 0.06, t = 1/6
    p6 = 2 * stats.t.sf(1 / 6, 1)
    assert table[4] == (f"| `top_k=1` | 27,000 | 5.3500 ± 0.0707 | 5.3600 ± 0.1556 | "
                        f"{welch_text([5.3, 5.4], [5.25, 5.47])} | +0.0100 [-0.7524, +0.7724] p={p6:.3f} |")
    s = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert s["elastic"]["submodels"] == SUBS
    assert s["elastic"]["loss"]["elastic"]["depth=2"] == {"1234": 5.2, "4321": 5.4}
    assert compare(dirs, tmp_path / "cmp2").read_text() == text  # deterministic


def test_elastic_section_only_with_evaluations(tmp_path, runs):
    assert "Elastic sub-models" not in compare(runs, tmp_path / "cmp").read_text()
    write_elastic_eval(runs[0], {"full": 5.0, "depth=2": 5.5}, {"full": 10, "depth=2": 8}, max_steps=4)
    text = compare(runs, tmp_path / "cmp").read_text()
    section = text.split("## Elastic sub-models")[1].split("\n## ")[0]
    assert "Without an elastic evaluation (left out here): base seed 2, alt seed 1, alt seed 2, alt seed 3." in section
    assert "| `full` | 10 | 5.0000 |" in section  # the baseline's one seed; no variant to compare with
