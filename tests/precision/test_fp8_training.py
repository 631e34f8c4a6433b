"""The FP8 recipe inside the model: custom backward, coverage, and an emulated run that tracks fp32."""

import numpy as np
import paddle
import pytest

from ernie5.runconfig import load_config
from ernie5.precision.config import FP8Config
from ernie5.precision.fp8 import fake_quant_blocks, fake_quant_tiles
from ernie5.model.transformer import enable_fp8
from ernie5.precision.fp8_linear import fp8_linear
from ernie5.train.trainer import Trainer


@pytest.mark.parametrize("store", [False, True])
def test_fp8_linear_forward_and_backward_follow_the_recipe(store):
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.normal(size=(3, 5, 160)).astype(np.float32), stop_gradient=False)
    w = paddle.to_tensor(rng.normal(size=(160, 48)).astype(np.float32), stop_gradient=False)
    dy = paddle.to_tensor(rng.normal(size=(3, 5, 48)).astype(np.float32))
    cfg = FP8Config(enabled=True, tile=128, block=128, store_activations=store)
    y = fp8_linear(x, w, cfg)
    (y * dy).sum().backward()
    x2, dy2, wq = x.reshape([15, 160]), dy.reshape([15, 48]), fake_quant_blocks(w, 128)
    np.testing.assert_allclose(y.numpy().reshape(15, 48), (fake_quant_tiles(x2, 128) @ wq).numpy(), rtol=1e-6)
    np.testing.assert_allclose(x.grad.numpy().reshape(15, 160), (fake_quant_tiles(dy2, 128) @ wq.T).numpy(),
                               rtol=1e-6)
    dw = fake_quant_tiles(x2.T, 128) @ fake_quant_tiles(dy2.T, 128).T
    np.testing.assert_allclose(w.grad.numpy(), dw.numpy(), rtol=1e-6)
    exact = (x2 @ w).numpy()  # and the recipe stays close to fp32: E4M3 has 3 mantissa bits
    assert np.abs(y.numpy().reshape(15, 48) - exact).max() < 0.1 * np.abs(exact).max()


def test_enable_fp8_covers_experts_or_all_block_linears(tiny_cfg):
    from ernie5.model.transformer import build_model

    cfg = tiny_cfg("model.vocab_size=50")
    model = build_model(cfg.model, seed=0)
    n_expert = enable_fp8(model, FP8Config(enabled=True, apply_to="experts"))
    moe_layers, per = 2, 2 * (4 + 1)  # routed + shared experts, gate_up and down each
    assert n_expert == moe_layers * per
    model = build_model(cfg.model, seed=0)
    assert enable_fp8(model, FP8Config(enabled=True, apply_to="all_linear")) > n_expert


def test_fp8_emulated_run_tracks_fp32(tiny_cfg, tmp_path, capfd, monkeypatch):
    import ernie5.precision.fp8_linear as fp8_linear

    monkeypatch.setattr(fp8_linear, "_NOTICE_SHOWN", False)  # once per process: an earlier FP8 test may have said it
    base = ["train.max_steps=16", "data.seq_len=32", "model.hidden_size=128", "model.moe.expert_ffn_size=64"]
    fp32 = Trainer(tiny_cfg(*base, f"run.output_dir={tmp_path / 'a'}"), quiet=True).train()
    fp8 = Trainer(tiny_cfg(*base, f"run.output_dir={tmp_path / 'b'}", "precision.fp8.enabled=true",
                           "precision.fp8.apply_to=all_linear", "precision.fp8.quantize_dispatch=true",
                           "precision.fp8.store_activations=true"), quiet=True).train()
    assert "FP8 GEMMs are emulated" in capfd.readouterr().err  # said once, not silently
    a, b = np.array([m["loss"] for m in fp32]), np.array([m["loss"] for m in fp8])
    assert not np.array_equal(a, b)  # FP8 really changed the numerics ...
    # the bound: every step within 5% of the fp32 loss, the last five steps' mean within 1%
    assert np.max(np.abs(a - b) / a) < 0.05, np.max(np.abs(a - b) / a)
    assert abs(a[-5:].mean() - b[-5:].mean()) / a[-5:].mean() < 0.01
    assert b[-5:].mean() < b[:5].mean() - 0.5  # and the FP8 run learns
