"""Token-balanced loss for text runs (NTP and every MTP depth) and in the unified objective's MTP; objective
settings a text-only run cannot use are refused; `Trainer.train_step()` works without `train()`.

The reference is an invariant, not the formula under test: with the masked mean, a term's gradient is
d(sum of losses) / n (n = its supervised positions); token-balanced, it is d(sum) / (C x rows). So the balanced
gradient equals the plain one times n / (C x rows), n counted from the label arrays.
"""

import numpy as np
import paddle
import pytest

from ernie5.errors import ConfigError
from ernie5.model.transformer import build_model, to_tensor_batch
from ernie5.objectives.config import ObjectiveConfig
from ernie5.objectives.parallel_ce import IGNORE
from ernie5.objectives.text import make_text_batch, text_loss
from ernie5.objectives.unified import UnifiedObjective
from tests.conftest import run_cli


def _text_model(tiny_cfg):
    cfg = tiny_cfg("model.vocab_size=600", "model.moe.aux_loss_coef=0", "model.moe.seq_aux_loss_coef=0",
                   "model.moe.z_loss_coef=0")
    return build_model(cfg.model, seed=3)


def _text_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 600, (2, 33))
    segments = np.zeros((2, 33), np.int64)
    segments[0, 20:] = 1  # two documents in row 0: targets across the boundary are ignored
    return make_text_batch(tokens, segments, 1)


def _grads(model, batch, mtp_weight, balance_length):
    out = text_loss(model, to_tensor_batch(batch), mtp_weight, balance_length=balance_length)
    out.total.backward()
    g = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    model.clear_gradients()
    return out, g


def _assert_scaled(got, plain, factor):
    assert got.keys() == plain.keys()
    for k in plain:
        # the two backward passes scale the per-row gradients before (not after) summing them, so an element
        # that is a sum of cancelling terms carries fp32 rounding relative to its largest terms, not to itself:
        # bound the error by the tensor's largest magnitude (a few ulp of it; 1e-5 leaves ~100x margin)
        want = plain[k] * factor
        np.testing.assert_allclose(got[k], want, rtol=0, atol=1e-5 * np.abs(want).max() + 1e-12, err_msg=k)


def test_text_ntp_and_mtp_are_token_balanced(tiny_cfg):
    model = _text_model(tiny_cfg)
    batch = _text_batch()
    C, rows = 40, 2
    n0 = int((batch["labels_0"] != IGNORE).sum())
    n1 = int((batch["labels_1"] != IGNORE).sum())
    assert n0 < C * rows and n1 < n0
    plain0, g_plain0 = _grads(model, batch, 0.0, 0)
    tb0, g_tb0 = _grads(model, batch, 0.0, C)
    assert tb0.terms["loss_ntp"] == pytest.approx(plain0.terms["loss_ntp"], rel=1e-6)  # the value is the mean
    _assert_scaled(g_tb0, g_plain0, n0 / (C * rows))
    # the MTP term's own gradient: (weight 1) - (weight 0)
    _, g_plain1 = _grads(model, batch, 1.0, 0)
    tb1, g_tb1 = _grads(model, batch, 1.0, C)
    assert tb1.terms["loss_mtp_1"] == pytest.approx(plain0.terms["loss_mtp_1"], rel=1e-6)
    mtp_plain = {k: g_plain1[k] - g_plain0[k] for k in g_plain0}
    mtp_tb = {k: g_tb1[k] - g_tb0[k] for k in g_tb0}
    for k in mtp_plain:  # differences of two fp32 gradients: compare against the larger operand's scale
        scale = np.abs(g_plain1[k]).max() * n1 / (C * rows) + 1e-12
        np.testing.assert_allclose(mtp_tb[k] / scale, mtp_plain[k] * n1 / (C * rows) / scale, atol=1e-4, err_msg=k)


def test_unified_mtp_is_token_balanced():
    from tests.objectives.test_unified import make_batch, tensors, tiny_cfg

    from ernie5.model.config import MTPConfig

    paddle.seed(0)
    cfg = tiny_cfg()
    cfg.mtp = MTPConfig(depth=1)
    model = build_model(cfg, seed=0)
    _, b = make_batch()
    t = tensors(b)
    rows, C = b["token"].shape[0], 48
    n1 = int((b["labels_1"] != IGNORE).sum())

    def mtp_grads(balanced):
        gs = []
        for w in (0.0, 1.0):
            obj = UnifiedObjective(ObjectiveConfig(token_balanced=balanced, token_balance_length=C), w, 48)
            obj.loss(model, t).total.backward()
            gs.append({n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None})
            model.clear_gradients()
        return {k: gs[1][k] - gs[0][k] for k in gs[0]}, gs[1]

    plain, plain_full = mtp_grads(False)
    tb, _ = mtp_grads(True)
    mtp_param = next(k for k in plain if k.startswith("mtp."))
    assert np.abs(plain[mtp_param]).max() > 0  # the MTP block only learns from the MTP term
    # differences of fp32 gradients: error bounded relative to the largest gradient of the model (some tensors,
    # e.g. attention key biases, have a true gradient of 0 and only rounding noise)
    scale = max(np.abs(g).max() for g in plain_full.values())
    for k in plain:
        np.testing.assert_allclose(tb[k] / scale, plain[k] * n1 / (C * rows) / scale, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("setting", ["objective.modality_weighting=posterior", "objective.bit_flip_rate=0.1",
                                     "objective.visual_weight=2.0", "objective.text_weight=0.5"])
def test_text_only_run_refuses_settings_it_cannot_use(tiny_cfg, setting):
    from ernie5.train.trainer import Trainer

    with pytest.raises(ConfigError) as e:
        Trainer(tiny_cfg(setting, "train.max_steps=1"), quiet=True)
    assert e.value.where == setting.split("=")[0] and "text-only" in e.value.reason


def test_text_only_refusal_is_one_line_exit_2(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    p = run_cli("train", "configs/tiny_text.yaml", f"run.output_dir={tmp_path / 'r'}", f"data.dir={cfg.data.dir}", "data.sources=[]",
                f"tokenizer.model_path={cfg.tokenizer.model_path}", "objective.modality_weighting=posterior")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("error: objective.modality_weighting:")


def test_token_balanced_text_run_trains(tiny_cfg):
    from ernie5.train.trainer import Trainer

    tr = Trainer(tiny_cfg("objective.token_balanced=true", "train.max_steps=12"), quiet=True)
    assert tr.task.balance_length == 32  # data.seq_len
    logged = tr.train()
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.3


def test_train_step_works_without_train(tiny_cfg):
    from ernie5.train.trainer import Trainer

    tr = Trainer(tiny_cfg("train.max_steps=2"), quiet=True)
    m = tr.train_step()
    assert m["step"] == 1 and np.isfinite(m["loss"]) and m["mfu"] > 0
