"""Elastic training end to end on the tiny config: loss, logging, exact resume, bias, export and eval CLIs."""

import json

import numpy as np
import paddle
import pytest
import yaml

import ernie5
from ernie5.cli import main
from ernie5.runconfig import load_config
from ernie5.elastic.submodel import SubModel
from ernie5.train.trainer import Trainer
from tests.conftest import tiny_overrides

ELASTIC = ["elastic.enabled=true", "model.num_layers=4", "elastic.depth.p_full=0.6", "elastic.width.p_full=0.6",
           "elastic.sparsity.p_full=0.6"]


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory, text_assets):
    """One 30-step elastic run (4 layers: 1 dense + 3 MoE, 4 experts, top-2), shared by the tests below."""
    _, tok, shards = text_assets
    run = tmp_path_factory.mktemp("elastic") / "run"
    cfg = load_config(None, tiny_overrides(run, shards, tok) + ELASTIC + ["train.max_steps=30"])
    logged = Trainer(cfg, quiet=True).train()
    return run, cfg, logged


def test_elastic_training_loss_falls_and_logs_sub_models(elastic_run):
    run, cfg, logged = elastic_run
    first, last = np.mean([m["loss"] for m in logged[:5]]), np.mean([m["loss"] for m in logged[-5:]])
    assert last < first - 1.0, (first, last)
    kinds = [k for m in logged for k in m["elastic_kind"].split(",")]
    assert len(kinds) == 30 * 2 and {"full", "depth", "width", "topk"} <= set(kinds)
    assert all(len(m["elastic_submodels"]) == 2 for m in logged)
    assert any("loss_full" in m for m in logged) and any("loss_sub" in m for m in logged)
    for m in logged:  # the step loss is the mean of its micro-steps' losses, whatever their kind
        parts = [m[f"loss_{k}"] for k in m["elastic_kind"].split(",")]
        assert abs(np.mean(parts) - m["loss"]) < 1e-4 or len(set(m["elastic_kind"].split(","))) == 1
    state = json.loads((run / "checkpoints/step_00000030/trainer_state.json").read_text())
    assert sum(state["elastic"]["kind_counts"].values()) == 60 and state["elastic"]["seed"] == cfg.run.seed
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "elastic_kind" in rec


def test_resume_reproduces_the_elastic_run_exactly(tiny_cfg, tmp_path):
    def run(name, steps):
        cfg = tiny_cfg(*ELASTIC, f"train.max_steps={steps}", f"run.output_dir={tmp_path / name}",
                       "checkpoint.interval=3")
        return Trainer(cfg, quiet=True).train()

    straight = run("a", 6)
    run("b", 3)
    resumed = run("b", 6)
    keys = ("loss", "elastic_kind", "elastic_submodels", "grad_norm")
    assert [[m[k] for k in keys] for m in straight[3:]] == [[m[k] for k in keys] for m in resumed]


def test_aux_free_bias_is_untouched_by_sub_model_steps(tiny_cfg, tmp_path):
    def train(name, steps, depth, width, k):
        tr = Trainer(tiny_cfg(f"train.max_steps={steps}", f"run.output_dir={tmp_path / name}", "elastic.enabled=true",
                              f"elastic.depth.p_full={depth}", f"elastic.width.p_full={width}",
                              f"elastic.sparsity.p_full={k}"), quiet=True)
        return tr, tr.train()

    for name, width, k in (("width", 0.0, 1.0), ("topk", 1.0, 0.0)):  # every micro-step routes a sub-model
        tr, logged = train(name, 3, 1.0, width, k)
        assert all(set(m["elastic_kind"].split(",")) == {name} for m in logged)
        assert all(np.all(l.router.e_score_correction_bias.numpy() == 0) for l in tr.model.moe_layers())
    tr, _ = train("depth", 2, 0.0, 1.0, 1.0)  # a depth-only cut routes like the full model: the bias keeps learning
    dropped, kept = tr.model.layers[1].mlp, tr.model.layers[2].mlp  # 3 layers: only layer 1 can be dropped
    assert np.all(dropped.router.e_score_correction_bias.numpy() == 0)  # never ran: no loads, no update
    assert np.abs(kept.router.e_score_correction_bias.numpy()).sum() > 0


def test_export_submodel_cli_round_trips_exactly(elastic_run, tmp_path, capsys):
    run, cfg, _ = elastic_run
    out = tmp_path / "sub"
    assert main(["export", str(run), "--submodel", "depth=3,experts=2,top_k=1", "--out", str(out)]) == 0
    assert "L3/4 E2/4 k1/2" in capsys.readouterr().out
    small = ernie5.load_model(str(out))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["num_layers"] == 3 and saved["model"]["moe"]["num_experts"] == 2
    assert saved["model"]["moe"]["top_k"] == 1 and saved["elastic"]["enabled"] is False
    full = ernie5.load_model(str(run))
    ids = paddle.to_tensor(np.random.default_rng(0).integers(0, saved["model"]["vocab_size"], (2, 16)))
    sub = SubModel(layers=(0, 2, 3), experts=(0, 1), top_k=1)  # the canonical cut of depth=3,experts=2
    np.testing.assert_allclose(small(ids).numpy(), full(ids, submodel=sub).numpy(), atol=1e-5, rtol=0)
    assert main(["export", str(run), "--submodel", "experts=9", "--out", str(tmp_path / "x")]) == 2
    assert main(["export", str(run), "--submodel", "depth=3", "--format", "hf", "--out", str(tmp_path / "y")]) == 2
    assert capsys.readouterr().err.count("error: ") == 2


def test_eval_elastic_writes_table_json_and_plot(elastic_run, tmp_path, capsys):
    run, _, _ = elastic_run
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--elastic", "--batches", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "elastic_eval.json").read_text())["rows"]
    names = [r["submodel"] for r in rows]
    assert names == ["full", "depth=3", "depth=2", "experts=2", "top_k=1", "depth=2,experts=2,top_k=1"]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert [(r["layers"], r["experts"], r["top_k"]) for r in rows] == [(4, 4, 2), (3, 4, 2), (2, 4, 2), (4, 2, 2),
                                                                       (4, 4, 1), (2, 2, 1)]
    assert rows[1]["spec"]["layers"] == [0, 2, 3]
    assert all(r["active_params"] < rows[0]["active_params"] for r in rows[1:])
    assert rows[3]["total_params"] < rows[0]["total_params"] == rows[4]["total_params"]
    assert (out / "elastic_eval.png").stat().st_size > 1000 and "| depth=3 |" in (out / "elastic_eval.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(run), "--batches", "1"]) == 0
    assert "held-out loss" in capsys.readouterr().out


def test_config_errors_exit_2(capsys):
    assert main(["config", "configs/ablations/elastic.yaml", "elastic.width.sizes=[16]", "model.vocab_size=64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: elastic.width.sizes[0]: 16 must be in [1, model.moe.num_experts 8)"]
    assert main(["config", "configs/ablations/elastic.yaml", "elastic.sparsity.k_min=2"]) == 2
    assert "elastic.sparsity.k_min: 2 > k_max 1" in capsys.readouterr().err
    assert main(["config", "configs/ablations/elastic_baseline.yaml"]) == 0
