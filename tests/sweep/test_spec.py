"""Sweep files: variants and grids x seeds expand in order, budgets become steps, and every mistake is one error
naming the sweep file, the variant and the key."""

import pytest

from ernie5.errors import UserError
from ernie5.sweep.spec import Evaluation, format_value, load_sweep
from tests.conftest import run_cli
from tests.sweep.helpers import write_base, write_sweep


def test_grid_times_seeds_in_order(tmp_path):
    write_base(tmp_path)
    s = load_sweep(str(write_sweep(tmp_path, """
kind: sweep
config: base.yaml
seeds: [3, 1]
budget: {steps: 5}
overrides: {train.eval_interval: 5}
grid:
  model.moe.top_k: [1, 2]
  optim.lr: [1.0e-3, 3.0e-3]
""")))
    runs = s.expand([], out=str(tmp_path / "out"))
    names = ["top_k-1,lr-0.001", "top_k-1,lr-0.003", "top_k-2,lr-0.001", "top_k-2,lr-0.003"]
    assert list(s.variants) == names
    assert [(r.variant, r.seed) for r in runs] == [(n, seed) for n in names for seed in (3, 1)]
    r = runs[2]  # top_k-1,lr-0.003 seed 3
    assert r.overrides == ["train.eval_interval=5", "model.moe.top_k=1", "optim.lr=0.003", "run.seed=3",
                           "train.max_steps=5"]
    assert r.run_dir == str(tmp_path / "out" / "top_k-1,lr-0.003" / "seed3")
    assert r.train_args()[-1] == f"run.output_dir={r.run_dir}" and r.max_steps == 5


def test_named_variants_tokens_budget_and_cli_overrides(tmp_path):
    write_base(tmp_path)  # 2 rows x 32 tokens x 1 accumulation = 64 tokens per step
    s = load_sweep(str(write_sweep(tmp_path, """
kind: sweep
config: base.yaml
out: OUT
budget: {tokens: 1000}
variants:
  base: {}
  accum2: {train.grad_accum_steps: 2}
""")))
    assert s.seeds == [None] and s.out == "OUT"
    runs = s.expand([])
    assert [r.max_steps for r in runs] == [16, 8]  # ceil(1000 / 64), ceil(1000 / 128)
    assert [r.seed for r in runs] == [0, 0]  # the base config's seed
    quick = s.expand(["train.max_steps=2"])  # the command line beats the budget
    assert [r.max_steps for r in quick] == [2, 2]
    assert quick[0].overrides[-1] == "train.max_steps=2"


def test_format_value_round_trips():
    import yaml

    for v in ["isolated", 0.01, 1e-5, 3, True, [1, 2], "yes", "1.5", {"a": 1}, None, ""]:
        assert yaml.safe_load(format_value(v)) == v, v


@pytest.mark.parametrize("body, where, reason", [
    ("config: base.yaml\nvariants: {a: {}}", "kind", "kind: sweep"),
    ("kind: sweep\nconfig: missing.yaml\nvariants: {a: {}}", "config", "not found"),
    ("kind: sweep\nconfig: base.yaml\nvariant: {a: {}}", "variant", "did you mean 'variants'"),
    ("kind: sweep\nconfig: base.yaml", "variants", "exactly one of"),
    ("kind: sweep\nconfig: base.yaml\nvariants: {a: {}}\ngrid: {x: [1]}", "variants", "exactly one of"),
    ("kind: sweep\nconfig: base.yaml\nvariants: {a b: {}}", "variants.a b", "directory name"),
    ("kind: sweep\nconfig: base.yaml\nvariants: {a: [x=1]}", "variants.a", "expected a mapping"),
    ("kind: sweep\nconfig: base.yaml\nvariants: {a: {run.seed: 3}}", "variants.a.run.seed", "set per run"),
    ("kind: sweep\nconfig: base.yaml\nseeds: [1, 1]\nvariants: {a: {}}", "seeds", "repeated"),
    ("kind: sweep\nconfig: base.yaml\nbudget: {steps: 1, tokens: 5}\nvariants: {a: {}}", "budget",
     "exactly one"),
    ("kind: sweep\nconfig: base.yaml\nbudget: {step: 1}\nvariants: {a: {}}", "budget.step", "unknown key"),
    ("kind: sweep\nconfig: base.yaml\ngrid: {model.moe.top_k: 2}", "grid.model.moe.top_k", "non-empty list"),
    ("kind: sweep\nconfig: base.yaml\nladder: {}\nvariants: {a: {}, b: {}}", "variants", "at least 3"),
    # grid keys get the same check as override keys: a string, not empty, no `=`
    ("kind: sweep\nconfig: base.yaml\ngrid: {1: [1, 2]}", "grid", "bad key 1 (expected a dotted config path)"),
    ("kind: sweep\nconfig: base.yaml\ngrid: {'': [1, 2]}", "grid", "bad key ''"),
    ("kind: sweep\nconfig: base.yaml\ngrid: {'optim.lr=1': [1, 2]}", "grid", "bad key 'optim.lr=1'"),
    ("kind: sweep\nconfig: base.yaml\ngrid: {run.seed: [1, 2]}", "grid.run.seed", "set per run"),
])
def test_bad_sweep_file_names_the_key(tmp_path, body, where, reason):
    write_base(tmp_path)
    path = write_sweep(tmp_path, body)
    with pytest.raises(UserError) as e:
        load_sweep(str(path))
    assert e.value.where == f"{path}: {where}"
    assert reason in e.value.reason


@pytest.mark.parametrize("variant, where, reason", [
    ("{model.moe.top_kk: 1}", "model.moe.top_kk", "did you mean 'top_k'"),
    ("{model.moe.top_k: 9}", "model.moe.top_k", "9 > num_experts 4"),
    ("{train.max_steps: 0}", "train.max_steps", "must be >= 1"),
])
def test_bad_variant_names_variant_and_key(tmp_path, variant, where, reason):
    write_base(tmp_path)
    path = write_sweep(tmp_path, f"kind: sweep\nconfig: base.yaml\nvariants:\n  ok: {{}}\n  broken: {variant}\n")
    s = load_sweep(str(path))
    with pytest.raises(UserError) as e:
        s.expand([])
    assert e.value.where == f"{path}: variant broken: {where}"
    assert reason in e.value.reason


def test_cli_may_not_set_the_sweeps_own_keys(tmp_path):
    write_base(tmp_path)
    s = load_sweep(str(write_sweep(tmp_path, "kind: sweep\nconfig: base.yaml\nvariants: {a: {}}\n")))
    with pytest.raises(UserError, match="set per run by the sweep"):
        s.expand(["run.output_dir=/tmp/x"])


def test_cli_error_is_one_line_exit_2(tmp_path):
    write_base(tmp_path)
    path = write_sweep(tmp_path, "kind: sweep\nconfig: base.yaml\nvariants:\n  a: {}\n  b: {optim.lrr: 1}\n")
    r = run_cli("sweep", str(path), "--out", str(tmp_path / "out"), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {path}: variant b: optim.lrr: unknown key (did you mean 'lr'?)"]
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_repo_sweep_files_expand():
    """Every sweep file in configs/sweeps parses and every run's config validates (no data is read)."""
    from tests.conftest import REPO

    files = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
    assert {f.stem for f in files} >= {"routing", "elastic", "data_mixture", "balancing", "ladder"}
    for f in files:
        runs = load_sweep(str(f.relative_to(REPO))).expand([])
        assert len(runs) >= 2, f
        if f.stem == "elastic":  # the README's elastic table comes from these evaluations
            assert all(r.evaluate == (Evaluation("elastic", 64),) for r in runs)


# ---- evaluate: --------------------------------------------------------------------------------------------
PREPARED = ["data.synthetic=false"]  # the elastic evaluation reads a prepared held-out split (not read here)


def test_evaluate_expands_into_every_run(tmp_path):
    write_base(tmp_path, PREPARED + ["model.num_layers=3"])
    s = load_sweep(str(write_sweep(tmp_path, """
kind: sweep
config: base.yaml
seeds: [1, 2]
evaluate:
  - {mode: elastic, batches: 64}
variants:
  non_elastic: {elastic.enabled: false}
  elastic: {elastic.enabled: true}
""")))
    assert s.evaluate == (Evaluation("elastic", 64),) and s.as_dict()["evaluate"] == [{"mode": "elastic",
                                                                                      "batches": 64}]
    runs = s.expand([], out=str(tmp_path / "out"))
    assert all(r.evaluate == (Evaluation("elastic", 64),) for r in runs) and len(runs) == 4
    r = runs[0]
    assert r.eval_args(r.evaluate[0]) == [
        f"{r.run_dir}/checkpoints/step_00000003", "--mode", "elastic", "--batches", "64",
        "--out", f"{r.run_dir}/eval/step_00000003"]
    default = load_sweep(str(write_sweep(tmp_path, "kind: sweep\nconfig: base.yaml\nevaluate: [{mode: elastic}]\n"
                                                   "variants: {a: {}}\n", "d.yaml")))
    assert default.evaluate == (Evaluation("elastic", 16),)  # ernie5 eval's default


@pytest.mark.parametrize("evaluate, where, reason", [
    ("{mode: elastic}", "evaluate", "expected a non-empty list"),
    ("[]", "evaluate", "expected a non-empty list"),
    ("[elastic]", "evaluate[0]", "expected a mapping"),
    ("[{mode: elastc}]", "evaluate[0].mode", "'elastc' is not an evaluation mode (known: elastic)"),
    ("[{batches: 4}]", "evaluate[0].mode", "None is not an evaluation mode"),
    ("[{mode: elastic, batches: 0}]", "evaluate[0].batches", "0 must be an integer >= 1"),
    ("[{mode: elastic, batches: many}]", "evaluate[0].batches", "'many' must be an integer >= 1"),
    ("[{mode: elastic, batches: true}]", "evaluate[0].batches", "True must be an integer >= 1"),
    ("[{mode: elastic, batch: 4}]", "evaluate[0].batch", "did you mean 'batches'"),
    ("[{mode: elastic}, {mode: elastic, batches: 2}]", "evaluate[1]", "listed twice"),
])
def test_bad_evaluate_names_the_key(tmp_path, evaluate, where, reason):
    write_base(tmp_path, PREPARED)
    path = write_sweep(tmp_path, f"kind: sweep\nconfig: base.yaml\nevaluate: {evaluate}\nvariants: {{a: {{}}}}\n")
    with pytest.raises(UserError) as e:
        load_sweep(str(path))
    assert e.value.where == f"{path}: {where}"
    assert reason in e.value.reason


@pytest.mark.parametrize("base, variant, reason", [
    (PREPARED, "{data.synthetic: true}",
     "variant v: elastic evaluation reads the held-out split of prepared data; data.synthetic is true"),
    # the non-elastic baseline is not checked by training (elastic off) but its grid must still exist
    (PREPARED, "{elastic.enabled: false, model.moe.top_k: 1}",
     "variant v: no sub-model grid: elastic.sparsity.p_full: model.moe.top_k 1 leaves no smaller k; set 1.0"),
    (PREPARED, "{elastic.depth.p_full: 1.0, elastic.width.p_full: 1.0, elastic.sparsity.p_full: 1.0}",
     "variant v: the sub-model grid is the full model only"),
])
def test_evaluate_needs_a_grid_and_prepared_data(tmp_path, base, variant, reason):
    write_base(tmp_path, base + ["model.num_layers=3"])
    path = write_sweep(tmp_path, f"kind: sweep\nconfig: base.yaml\nevaluate: [{{mode: elastic}}]\n"
                                 f"variants:\n  ok: {{}}\n  v: {variant}\n")
    s = load_sweep(str(path))
    with pytest.raises(UserError) as e:
        s.expand([])
    assert e.value.where == f"{path}: evaluate[0]" and reason in e.value.reason, e.value.reason


def test_bad_evaluate_cli_is_one_line_exit_2(tmp_path):
    write_base(tmp_path, PREPARED)
    path = write_sweep(tmp_path, "kind: sweep\nconfig: base.yaml\nevaluate: [{mode: elastic, batches: 0}]\n"
                                 "variants: {a: {}}\n")
    r = run_cli("sweep", str(path), "--out", str(tmp_path / "out"), timeout=120)
    assert r.returncode == 2 and not (tmp_path / "out").exists()
    assert r.stderr.strip().splitlines() == [f"error: {path}: evaluate[0].batches: 0 must be an integer >= 1"]
