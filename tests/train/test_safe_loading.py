"""Checkpoints and tokenizer assets load without unpickling: a crafted pickle is refused before it can run,
legacy pickle checkpoints load only with the opt-in, and the new formats round-trip exactly."""

import json
import os
import pickle

import numpy as np
import paddle
import pytest

import ernie5
from ernie5.data.shards import sha256_file
from ernie5.errors import UserError
from ernie5 import tensor_io
from ernie5.train import checkpoint as ckpt
from ernie5.train.trainer import Trainer
from tests.conftest import run_cli


class Payload:
    """Unpickling this creates the directory `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def payload_bytes(marker) -> bytes:
    data = pickle.dumps({"paddle": Payload(marker)})
    probe = marker.parent / (marker.name + "-probe")
    pickle.loads(pickle.dumps(Payload(probe)))  # the payload really does run when unpickled ...
    assert probe.is_dir()
    probe.rmdir()
    return data


def refresh_manifest(path):
    """Re-sign a doctored checkpoint, as an attacker could: only the payload should stop it from loading."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(path.iterdir()) if f.is_file() and f.name != ckpt.MANIFEST}
    (path / ckpt.MANIFEST).write_text(json.dumps({"format": 1, "step": 0, "files": files}))


@pytest.fixture
def trained(tiny_cfg, tmp_path):
    """(run dir, its step-2 checkpoint, config maker) of a 2-step tiny run."""
    run = tmp_path / "run0"
    Trainer(tiny_cfg("train.max_steps=2", f"run.output_dir={run}"), quiet=True).train()
    return run, run / "checkpoints" / "step_00000002", lambda *extra: tiny_cfg(f"run.output_dir={run}", *extra)


def test_checkpoint_holds_no_pickle(trained):
    _, step, _ = trained
    names = {p.name for p in step.iterdir()}
    assert names == {"model.safetensors", "optimizer.safetensors", "rng.json", "trainer_state.json", "config.yaml",
                     "manifest.json"}
    for name in names:
        assert not (step / name).read_bytes().startswith(b"\x80"), name  # no pickle protocol header anywhere
    rng = json.loads((step / "rng.json").read_text())
    assert rng["format"] == 1 and set(rng["paddle"][0]) == {"device", "seed", "offset", "engine"}


@pytest.mark.parametrize("target", ["rng", "model", "optimizer"])
def test_crafted_pickle_in_checkpoint_is_refused_unrun(trained, tmp_path, target):
    _, step, make = trained
    marker = tmp_path / "pwned"
    legacy = {"rng": ("rng.json", "rng.pkl"), "model": ("model.safetensors", "model.pdparams"),
              "optimizer": ("optimizer.safetensors", "optimizer.pdopt")}[target]
    (step / legacy[0]).unlink()
    (step / legacy[1]).write_bytes(payload_bytes(marker))
    refresh_manifest(step)
    with pytest.raises(UserError) as e:
        Trainer(make("train.max_steps=4"), quiet=True)
    assert not marker.exists()
    line = e.value.line()
    assert "\n" not in line and line.startswith(f"error: {step / legacy[1]}: legacy pickle checkpoint")
    assert "checkpoint.allow_pickle=true" in line and "trust" in line
    if target == "model":  # every way in to the weights refuses it too
        with pytest.raises(UserError, match="legacy pickle checkpoint"):
            ernie5.load_model(str(step))
        r = run_cli("export", str(step), "--format", "native", "--out", str(tmp_path / "exp"))
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
        assert "legacy pickle checkpoint" in r.stderr
        assert not marker.exists()


def test_cli_train_refuses_crafted_rng_pickle_with_exit_2(trained, tmp_path):
    _, step, _ = trained
    marker = tmp_path / "pwned"
    (step / "rng.json").unlink()
    (step / "rng.pkl").write_bytes(payload_bytes(marker))
    refresh_manifest(step)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text((step / "config.yaml").read_text())
    r = run_cli("train", str(cfg_path), "train.max_steps=3", "train.progress_bar=false")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {step / 'rng.pkl'}: legacy pickle checkpoint")
    assert not marker.exists()


def test_native_export_never_prefers_a_pickle(trained, tmp_path, monkeypatch):
    run, _, _ = trained
    out = tmp_path / "native"
    r = run_cli("export", str(run), "--format", "native", "--out", str(out))
    assert r.returncode == 0, r.stderr
    marker = tmp_path / "pwned"
    (out / "model.pdparams").write_bytes(payload_bytes(marker))
    refresh_manifest(out)
    monkeypatch.setenv(tensor_io.ALLOW_PICKLE_ENV, "1")  # even with the opt-in, the safetensors file wins
    state = ckpt.load_model_weights(out, allow_pickle=True)
    assert not marker.exists()
    assert set(state) == set(tensor_io.load_tensors(out / "model.safetensors"))
    ernie5.load_model(str(out))
    assert not marker.exists()


def test_crafted_pickle_tokenizer_asset_is_refused_unrun(tmp_path, monkeypatch):
    from ernie5.modality.media_io import load_asset

    marker = tmp_path / "pwned"
    for name in ("vision.pdparams", "vision.safetensors"):
        (tmp_path / name).write_bytes(payload_bytes(marker))
    (tmp_path / "vision.json").write_text(json.dumps({"kind": "vision", "config": {}}))
    with pytest.raises(UserError) as e:
        load_asset(str(tmp_path / "vision.pdparams"))
    assert "legacy pickle tokenizer asset; loading it can run code" in e.value.line()
    monkeypatch.setenv(tensor_io.ALLOW_PICKLE_ENV, "1")  # a .safetensors name is never unpickled, opt-in or not
    with pytest.raises(UserError, match="not a safetensors file"):
        load_asset(str(tmp_path / "vision.safetensors"))
    assert not marker.exists()


def test_recipe_output_must_be_safetensors():
    from ernie5.config.schema import build
    from ernie5.modality.media_io import TokenizerRecipe

    with pytest.raises(UserError, match="must end in .safetensors"):
        build(TokenizerRecipe, {"output": "tokenizers/v.pdparams"}, "")


def _to_legacy(step):
    """Rewrite a checkpoint in the old pickle layout (what earlier versions wrote)."""
    for stem, suffix in (("model", ".pdparams"), ("optimizer", ".pdopt")):
        state = {k: paddle.to_tensor(v) for k, v in tensor_io.load_tensors(step / f"{stem}.safetensors").items()}
        paddle.save(state, str(step / f"{stem}{suffix}"))
        (step / f"{stem}.safetensors").unlink()
    saved = paddle.get_rng_state()
    ckpt.set_rng_state(json.loads((step / "rng.json").read_text()), "rng.json")
    with open(step / "rng.pkl", "wb") as f:
        pickle.dump({"paddle": paddle.get_rng_state()}, f)
    paddle.set_rng_state(saved)
    (step / "rng.json").unlink()
    refresh_manifest(step)


def test_legacy_pickle_checkpoint_resumes_exactly_with_opt_in(tiny_cfg, tmp_path, monkeypatch):
    def run(name, steps, *extra):
        out = tmp_path / name
        Trainer(tiny_cfg(f"train.max_steps={steps}", f"run.output_dir={out}", "checkpoint.interval=2", *extra),
                quiet=True).train()
        return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]

    straight = run("a", 4)
    run("b", 2)
    _to_legacy(tmp_path / "b" / "checkpoints" / "step_00000002")
    with pytest.raises(UserError, match="legacy pickle checkpoint"):
        run("b", 4)
    monkeypatch.delenv(tensor_io.ALLOW_PICKLE_ENV, raising=False)
    with pytest.raises(UserError):
        ernie5.load_model(str(tmp_path / "b"))
    monkeypatch.setenv(tensor_io.ALLOW_PICKLE_ENV, "1")  # the env var opens the read-only paths ...
    ernie5.load_model(str(tmp_path / "b"))
    monkeypatch.delenv(tensor_io.ALLOW_PICKLE_ENV)
    assert run("b", 4, "checkpoint.allow_pickle=true") == straight  # ... the config flag a resume, bit-exactly


def test_rng_state_json_round_trip_and_malformed(tmp_path):
    paddle.seed(7)
    paddle.rand([10])
    state = json.loads(json.dumps(ckpt.rng_state()))
    want = paddle.rand([6]).numpy()
    paddle.rand([100])
    ckpt.set_rng_state(state, "rng.json")
    assert np.array_equal(paddle.rand([6]).numpy(), want)
    bad = json.loads(json.dumps(state))
    bad["paddle"][0]["engine"] = "1 2 3"
    for broken in (bad, {"format": 1, "paddle": "x"}, {"paddle": []}, {}):
        with pytest.raises(UserError, match="malformed RNG state"):
            ckpt.set_rng_state(broken, "rng.json")


def test_safetensors_state_round_trip_dtypes_and_extras(tmp_path):
    state = {"w": paddle.to_tensor(np.arange(6, dtype=np.float32).reshape(2, 3)),
             "b16": paddle.to_tensor(np.array([1.5, -2.25, 3e-3], np.float32)).astype(paddle.bfloat16),
             "i": np.array([1, 2, 3], np.int64), "flag": paddle.to_tensor(np.array([True, False])),
             "LR_Scheduler": {"last_epoch": 3, "last_lr": 0.1}}
    tensor_io.save_tensors(state)(tmp_path / "s.safetensors")
    back = tensor_io.load_tensors(tmp_path / "s.safetensors")
    assert set(back) == set(state) and back["LR_Scheduler"] == state["LR_Scheduler"]
    np.testing.assert_array_equal(back["w"], state["w"].numpy())
    np.testing.assert_array_equal(back["i"], state["i"])
    np.testing.assert_array_equal(back["flag"], [True, False])
    assert back["b16"].dtype == paddle.bfloat16
    np.testing.assert_array_equal(back["b16"].astype("float32").numpy(), state["b16"].astype("float32").numpy())
    with pytest.raises(TypeError, match="neither a tensor nor JSON"):
        tensor_io.save_tensors({"x": object()})(tmp_path / "t.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04junk")
    with pytest.raises(UserError, match="not a safetensors file"):
        tensor_io.load_tensors(tmp_path / "junk.safetensors")
