"""Router math, sort-based dispatch, balancing: against NumPy / dense references."""

import numpy as np
import paddle
import pytest

from ernie5.runconfig import load_config
from ernie5.model.moe import MoELayer, Router, balance_losses
from ernie5.train.algorithm import orthogonal_loss
from ernie5.train.callbacks import routing_summary


def moe_cfg(*extra):
    return load_config(None, ["model.hidden_size=16", "model.num_heads=2", "model.num_kv_heads=2",
                              "model.moe.num_experts=6", "model.moe.top_k=2", "model.moe.expert_ffn_size=8",
                              *extra]).model


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_router_matches_numpy_reference():
    paddle.seed(0)
    cfg = moe_cfg()
    router = Router(16, cfg.moe, 0.5)
    bias = np.array([0.0, 0.3, -0.2, 0.0, 0.1, 0.0], dtype=np.float32)
    router.e_score_correction_bias.set_value(paddle.to_tensor(bias))
    x = np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32)
    r = router(paddle.to_tensor(x))
    probs = np_softmax(x @ router.weight.numpy())
    ids = np.argsort(-(probs + bias), axis=-1, kind="stable")[:, :2]
    w = np.take_along_axis(probs, ids, -1)
    w = w / np.maximum(w.sum(-1, keepdims=True), cfg.moe.norm_min)
    np.testing.assert_array_equal(np.sort(r.topk_ids_TK.numpy(), -1), np.sort(ids, -1))
    # weights are the *unbiased* probabilities of the chosen experts, renormalised
    got = {(t, int(e)): float(v) for t in range(32) for e, v in zip(r.topk_ids_TK.numpy()[t], r.topk_w_TK.numpy()[t])}
    want = {(t, int(e)): float(v) for t in range(32) for e, v in zip(ids[t], w[t])}
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-5, atol=1e-6)


def dense_reference(layer: MoELayer, x_TH: paddle.Tensor) -> paddle.Tensor:
    """Every token through each of its chosen experts, one token at a time (no sorting, no slicing)."""
    r = layer.router(x_TH)
    ids, w = r.topk_ids_TK.numpy(), r.topk_w_TK
    rows = []
    for t in range(x_TH.shape[0]):
        acc = 0
        for j in range(ids.shape[1]):
            acc = acc + w[t, j] * layer.experts[int(ids[t, j])](x_TH[t:t + 1])[0]
        rows.append(acc)
    y = paddle.stack(rows)
    return y + layer.shared(x_TH) if layer.shared is not None else y


@pytest.mark.parametrize("shared", [0, 1])
def test_sort_dispatch_matches_dense_forward_and_grads(shared):
    paddle.seed(1)
    layer = MoELayer(moe_cfg(f"model.moe.num_shared_experts={shared}"))
    layer.eval()  # no count bookkeeping
    x_np = np.random.default_rng(1).normal(size=(2, 9, 16)).astype(np.float32)

    def run(fn):
        x = paddle.to_tensor(x_np, stop_gradient=False)
        y = fn(x)
        (y * paddle.to_tensor(np.linspace(-1, 1, y.size, dtype=np.float32).reshape(y.shape))).sum().backward()
        grads = {n: p.grad.numpy().copy() for n, p in layer.named_parameters() if p.grad is not None}
        xg = x.grad.numpy().copy()
        layer.clear_gradients(set_to_zero=False)
        return y.numpy(), xg, grads

    y1, xg1, g1 = run(lambda x: layer(x)[0])
    y2, xg2, g2 = run(lambda x: dense_reference(layer, x.reshape([18, 16])).reshape([2, 9, 16]))
    np.testing.assert_allclose(y1, y2, atol=1e-5)
    np.testing.assert_allclose(xg1, xg2, atol=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 3
    for k in g1:
        np.testing.assert_allclose(g1[k], g2[k], atol=1e-5, err_msg=k)


def test_aux_free_bias_balances_a_skewed_router():
    paddle.seed(2)
    layer = MoELayer(moe_cfg())
    layer.train()
    x = paddle.to_tensor(np.abs(np.random.default_rng(2).normal(size=(1, 512, 16))).astype(np.float32))
    with paddle.no_grad():  # skew: positive inputs and a raised weight column send every token to expert 0
        w = layer.router.weight.numpy()
        w[:, 0] = 0.15
        layer.router.weight.set_value(paddle.to_tensor(w))
    history = []
    for _ in range(400):
        layer.step_counts[:] = 0
        layer(x)  # a training forward (grad enabled) counts loads
        counts = layer.step_counts.copy()
        history.append(counts.max() / counts.mean())
        layer.update_bias(1e-3, counts)
    assert history[0] > 2.5  # the skew is real: expert 0 takes every token
    assert np.mean(history[-20:]) < 1.4, history[-20:]
    assert layer.router.e_score_correction_bias.numpy()[0] < 0  # the overloaded expert was pushed down


def test_balance_losses_match_formulas():
    paddle.seed(3)
    cfg = moe_cfg("model.moe.aux_loss_coef=1.0")
    router = Router(16, cfg.moe, 0.5)
    x = np.random.default_rng(3).normal(size=(12, 16)).astype(np.float32)
    r = router(paddle.to_tensor(x))
    counts = np.bincount(r.topk_ids_TK.numpy().ravel(), minlength=6)
    probs = r.probs_TE.numpy()
    switch = 6 * np.sum(counts / 24 * probs.mean(0))
    np.testing.assert_allclose(float(balance_losses(cfg.moe, r, counts, 2)), switch, rtol=1e-5)
    cfg_z = moe_cfg("model.moe.z_loss_coef=1.0").moe
    logits = r.logits_TE.numpy()
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(float(balance_losses(cfg_z, r, counts, 2)), np.mean(lse ** 2), rtol=1e-5)
    cfg_s = moe_cfg("model.moe.seq_aux_loss_coef=1.0").moe
    ids = r.topk_ids_TK.numpy().reshape(2, 6, 2)
    want = 0.0
    for b in range(2):
        f = np.bincount(ids[b].ravel(), minlength=6) * 6 / (2 * 6)
        want += np.sum(f * probs.reshape(2, 6, 6)[b].mean(0)) / 2
    np.testing.assert_allclose(float(balance_losses(cfg_s, r, counts, 2)), want, rtol=1e-5)
    assert balance_losses(moe_cfg().moe, r, counts, 2) is None


def test_orthogonal_loss_and_routing_summary():
    eye = paddle.eye(4)  # [H=4, E=4]: orthonormal expert rows -> loss 0
    assert float(orthogonal_loss(eye)) == pytest.approx(0.0, abs=1e-7)
    same = paddle.ones([4, 3])  # three identical rows: gram all ones, off-diagonal 6 ones
    assert float(orthogonal_loss(same)) == pytest.approx(6 / 9, rel=1e-5)
    s = routing_summary(np.array([[5, 5, 5, 5], [20, 0, 0, 0]]))
    np.testing.assert_allclose(s["entropy"], [1.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(s["max_over_mean"], [1.0, 4.0])
