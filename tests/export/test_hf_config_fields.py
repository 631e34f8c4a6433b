"""config.json fields other ERNIE 4.5 readers need: the MTP depth under PaddleFormers' key
(`num_nextn_predict_layers`, which it takes as 1 when absent) and the ERNIE key, and the weights' dtype under
transformers 5's `dtype` and transformers 4 / PaddleFormers' `torch_dtype`; and imports of configs that carry
only one spelling of the depth."""

import json

import numpy as np
import pytest

import ernie5
from ernie5.errors import UserError
from ernie5.export import export_hf, import_hf
from tests.export.tiny import make_checkpoint


def _rewrite(hf_dir, drop=(), **fields):
    path = hf_dir / "config.json"
    cfg = {k: v for k, v in json.loads(path.read_text()).items() if k not in drop}
    path.write_text(json.dumps({**cfg, **fields}))


def _state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_exported_config_states_mtp_depth_and_dtype_under_every_readers_key(tmp_path, tok_model):
    ckpt, _, _ = make_checkpoint(tmp_path / "mtp2", tok_model, "model.mtp.depth=2")
    hf = json.loads((export_hf(str(ckpt), str(tmp_path / "hf2")) / "config.json").read_text())
    assert hf["num_nextn_predict_layers"] == hf["multi_token_pred_depth"] == 2
    assert hf["torch_dtype"] == hf["dtype"] == "float32"
    # without MTP the depth is still written: PaddleFormers would otherwise build one MTP layer
    ckpt, _, _ = make_checkpoint(tmp_path / "mtp0", tok_model)
    hf = json.loads((export_hf(str(ckpt), str(tmp_path / "hf0")) / "config.json").read_text())
    assert hf["num_nextn_predict_layers"] == hf["multi_token_pred_depth"] == 0


def test_transformers_reads_the_dtype_fields(tmp_path, tok_model):
    import torch
    import transformers

    ckpt, _, _ = make_checkpoint(tmp_path, tok_model, "model.mtp.depth=1")
    out = export_hf(str(ckpt), str(tmp_path / "hf"))
    assert transformers.AutoConfig.from_pretrained(str(out)).dtype == torch.float32


def test_import_accepts_either_mtp_key_and_checks_it_against_the_weights(tmp_path, tok_model):
    ckpt, model, _ = make_checkpoint(tmp_path, tok_model, "model.mtp.depth=2")
    out = export_hf(str(ckpt), str(tmp_path / "hf"))
    want = _state(model)
    for only, other in [("num_nextn_predict_layers", "multi_token_pred_depth"),
                        ("multi_token_pred_depth", "num_nextn_predict_layers")]:
        _rewrite(out, drop=(other,))
        reloaded = ernie5.load_model(str(import_hf(str(out), str(tmp_path / f"ckpt_{only}"))))
        assert reloaded.cfg.mtp.depth == 2, only
        got = _state(reloaded)
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)
        _rewrite(out, **{other: 2})  # back to both keys
    bad = {"states 1 MTP layers, the weights hold 2": {"num_nextn_predict_layers": 1, "multi_token_pred_depth": 1},
           "disagree": {"num_nextn_predict_layers": 2, "multi_token_pred_depth": 1},
           "is not a number of MTP layers": {"num_nextn_predict_layers": "2"}}
    for i, (message, fields) in enumerate(bad.items()):
        _rewrite(out, **fields)
        with pytest.raises(UserError, match=message):
            import_hf(str(out), str(tmp_path / f"bad_{i}"))


def test_config_stating_mtp_without_mtp_weights_imports_without_mtp(tmp_path, tok_model, capsys):
    from safetensors.numpy import load_file, save_file

    ckpt, model, _ = make_checkpoint(tmp_path, tok_model, "model.mtp.depth=1")
    out = export_hf(str(ckpt), str(tmp_path / "hf"))
    weights = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("model.mtp_")}, str(out / "model.safetensors"))
    reloaded = ernie5.load_model(str(import_hf(str(out), str(tmp_path / "ckpt"))))
    assert reloaded.cfg.mtp.depth == 0
    assert "states 1 MTP layers but" in capsys.readouterr().err


def test_export_warns_when_paddleformers_would_build_a_moe_mtp_block(tmp_path, tok_model, capsys):
    ckpt, _, _ = make_checkpoint(tmp_path / "a", tok_model, "model.mtp.depth=1")  # block 0 dense: no warning
    export_hf(str(ckpt), str(tmp_path / "hf_a"))
    assert "MTP block" not in capsys.readouterr().err
    ckpt, _, _ = make_checkpoint(tmp_path / "b", tok_model, "model.mtp.depth=2")  # layer 1 is a MoE layer
    export_hf(str(ckpt), str(tmp_path / "hf_b"))
    assert "PaddleFormers builds MTP block(s) [1] as MoE layers" in capsys.readouterr().err
