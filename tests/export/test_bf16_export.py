"""Exports in bf16 (`ernie5 export --dtype bf16`): real BF16 entries, equal bit for bit to the fp32 weights rounded
to nearest even; routers stay fp32; transformers and ernie5 load them."""

import json

import numpy as np
import paddle

import ernie5
from ernie5.export import export_native
from ernie5.export.hf_layout import to_hf_tensors
from ernie5.tensor_io import load_tensors
from tests.conftest import run_cli
from tests.export.tiny import ernie_logits, make_checkpoint, token_ids
from tests.precision.test_bf16 import np_round_bf16


def _rounded_model(model, keep_fp32):
    """`model` with every floating weight rounded to bf16 (NumPy reference) except the `keep_fp32(name)` ones."""
    with paddle.no_grad():
        for k, v in model.state_dict().items():
            if v.dtype == paddle.float32 and not keep_fp32(k):
                v.set_value(np_round_bf16(v.numpy()))
    return model


def _header_dtypes(path) -> dict[str, str]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return {k: v["dtype"] for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


def test_hf_bf16_export_is_bf16_rounded_bit_for_bit_and_loads_in_transformers(tmp_path, tok_model):
    import torch
    import transformers
    from safetensors.torch import load_file

    ckpt, model, cfg = make_checkpoint(tmp_path, tok_model, "model.mtp.depth=1")
    r = run_cli("export", str(tmp_path), "--out", str(tmp_path / "hf"), "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "hf"
    hf = json.loads((out / "config.json").read_text())
    assert hf["dtype"] == hf["torch_dtype"] == "bfloat16"
    router = lambda k: k.endswith(".mlp.gate.weight") or ".mlp.moe_statics." in k  # noqa: E731
    want = to_hf_tensors({k: v.numpy() for k, v in model.state_dict().items()}, cfg.model, "test")
    header = _header_dtypes(out / "model.safetensors")
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == want.keys() and any(router(k) for k in want)
    for k, w in want.items():
        if router(k):  # the gate and the aux-free bias stay fp32, as transformers keeps them
            assert header[k] == "F32" and np.array_equal(got[k].numpy(), w), k
        else:
            assert header[k] == "BF16" and got[k].dtype == torch.bfloat16, k
            bits = got[k].view(torch.int16).numpy().view(np.uint16)
            assert np.array_equal(bits, (np_round_bf16(w).view(np.uint32) >> 16).astype(np.uint16)), k

    # transformers reads bf16 weights as bf16 (router fp32); loaded as fp32 they give the rounded model's logits
    auto = transformers.Ernie4_5_MoeForCausalLM.from_pretrained(str(out))
    dtypes = {n: p.dtype for n, p in auto.named_parameters()}
    assert dtypes["model.layers.1.mlp.gate.weight"] == torch.float32
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    hf32 = transformers.Ernie4_5_MoeForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = token_ids(2, 9)
    with torch.no_grad():
        theirs = hf32(torch.from_numpy(ids)).logits.numpy()
    rounded = _rounded_model(model, lambda k: "router." in k)
    np.testing.assert_allclose(theirs, ernie_logits(rounded, ids), atol=1e-4, rtol=0)

    # and ernie5 imports it back: the rounded weights exactly
    r = run_cli("import", str(out), "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    back = ernie5.load_model(str(tmp_path / "back"))
    for k, v in rounded.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k].numpy(), v.numpy(), err_msg=k)


def test_native_bf16_export_round_trips_the_rounded_weights(tmp_path, tok_model):
    ckpt, model, cfg = make_checkpoint(tmp_path, tok_model, "model.tie_embeddings=false")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    out = export_native(str(ckpt), str(tmp_path / "native"), dtype="bf16")
    header = _header_dtypes(out / "model.safetensors")
    back = load_tensors(out / "model.safetensors")
    assert back.keys() == state.keys()
    for k, v in state.items():
        is_router = "router." in k
        assert header[k] == ("F32" if is_router else "BF16"), k
        assert back[k].dtype == np.float32
        assert np.array_equal(back[k].view(np.uint32), (v if is_router else np_round_bf16(v)).view(np.uint32)), k
    reloaded = ernie5.load_model(str(out))
    rounded = _rounded_model(model, lambda k: "router." in k)
    ids = token_ids(2, 7)
    np.testing.assert_array_equal(ernie_logits(reloaded, ids), ernie_logits(rounded, ids))
    # fp32 stays the default and lossless
    out32 = export_native(str(ckpt), str(tmp_path / "native32"))
    assert set(_header_dtypes(out32 / "model.safetensors").values()) == {"F32"}
