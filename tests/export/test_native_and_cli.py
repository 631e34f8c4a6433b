"""Native safetensors export round-trips exactly; `ernie5 export` / `ernie5 import` on the command line."""

import json

import numpy as np

import ernie5
from ernie5.export import export_native
from tests.conftest import run_cli
from tests.export.tiny import ernie_logits, make_checkpoint, token_ids


def test_native_export_round_trips_logits_exactly(tmp_path, tok_model):
    ckpt, model, cfg = make_checkpoint(tmp_path, tok_model, "model.mtp.depth=1", "model.tie_embeddings=false")
    out = export_native(str(ckpt), str(tmp_path / "native"))
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.yaml", "tokenizer.model", "manifest.json"}
    reloaded = ernie5.load_model(str(out))
    ids = token_ids(2, 9)
    np.testing.assert_array_equal(ernie_logits(reloaded, ids), ernie_logits(model, ids))
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[k].numpy(), v.numpy(), err_msg=k)
    assert reloaded.cfg == cfg.model


def test_cli_export_and_import(tmp_path, tok_model):
    ckpt, model, _ = make_checkpoint(tmp_path, tok_model)
    r = run_cli("export", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "hf"), "--max-shard-size", "40KB")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    r = run_cli("import", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    ids = token_ids(1, 6)
    np.testing.assert_array_equal(ernie_logits(ernie5.load_model(str(tmp_path / "back")), ids),
                                  ernie_logits(model, ids))


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, tok_model):
    (tmp_path / "not_hf").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    make_checkpoint(tmp_path / "run", tok_model)
    cases = [
        (["export", str(tmp_path / "missing"), "--format", "hf", "--out", str(tmp_path / "o1")], "no such checkpoint"),
        (["import", str(tmp_path / "not_hf"), "--out", str(tmp_path / "o2")], "no config.json"),
        (["export", str(tmp_path / "run"), "--format", "native", "--out", str(tmp_path / "full")], "not an empty"),
    ]
    for args, reason in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], r.stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
