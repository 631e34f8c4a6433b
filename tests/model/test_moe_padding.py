"""Padding positions (modality -1) are not routed: not counted, not in any balancing loss, no routed output.

References are computed in NumPy from the router's own weights on the real tokens only (the router itself is
checked against NumPy in test_moe.py).
"""

import numpy as np
import paddle
import pytest

from ernie5.runconfig import load_config
from ernie5.model.moe import MoELayer

E, K, H = 6, 2, 16


def layer_with(*extra):
    cfg = load_config(None, ["model.hidden_size=16", "model.num_heads=2", "model.num_kv_heads=2",
                             f"model.moe.num_experts={E}", f"model.moe.top_k={K}", "model.moe.expert_ffn_size=8",
                             "model.moe.num_shared_experts=1", *extra]).model
    paddle.seed(5)
    layer = MoELayer(cfg)
    layer.train()
    return layer


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def batch(seed=0):
    """[2, 6, H] hidden states; row 0 ends with 1 pad, row 1 with 3; modalities mixed (text, image, audio)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 6, H)).astype(np.float32)
    mod = np.array([[0, 1, 1, 3, 0, -1], [0, 0, 2, -1, -1, -1]], np.int64)
    return x, mod


def reference(layer, x, mod):
    """Counts, modality counts and the sum of the three balancing losses over real tokens only."""
    real = mod >= 0
    x_real = x[real]
    row = np.nonzero(real)[0]
    logits = x_real @ layer.router.weight.numpy()
    probs = np_softmax(logits)
    bias = layer.router.e_score_correction_bias.numpy()
    ids = np.argsort(-(probs + bias), axis=-1, kind="stable")[:, :K]
    counts = np.bincount(ids.ravel(), minlength=E)
    mod_counts = np.zeros((4, E), np.int64)
    for t in range(len(ids)):
        for e in ids[t]:
            mod_counts[mod[real][t], e] += 1
    T = len(x_real)
    switch = E * np.sum(counts / (T * K) * probs.mean(0))
    seq = []
    for b in range(2):
        sel = row == b
        f = np.bincount(ids[sel].ravel(), minlength=E) * E / (K * sel.sum())
        seq.append(np.sum(f * probs[sel].mean(0)))
    lse = np.log(np.exp(logits).sum(-1))
    return counts, mod_counts, switch + np.mean(seq) + np.mean(lse ** 2)


ALL_LOSSES = ("model.moe.aux_loss_coef=1.0", "model.moe.seq_aux_loss_coef=1.0", "model.moe.z_loss_coef=1.0")


def test_padding_is_not_routed_counted_or_balanced():
    layer = layer_with(*ALL_LOSSES)
    x, mod = batch()
    y, aux = layer(paddle.to_tensor(x), None, paddle.to_tensor(mod))
    counts, mod_counts, aux_want = reference(layer, x, mod)
    np.testing.assert_array_equal(layer.step_counts, counts)
    assert layer.step_counts.sum() == (mod >= 0).sum() * K  # exactly the real tokens' K slots
    np.testing.assert_array_equal(layer.modality_counts, mod_counts)
    # three fp32 reductions over <= 12 tokens of O(1) values: well inside 1e-5 relative
    np.testing.assert_allclose(float(aux), aux_want, rtol=1e-5)
    # a padding position's output is the shared expert alone (nothing routed)
    pad = mod < 0
    shared = layer.shared(paddle.to_tensor(x[pad])).numpy()
    np.testing.assert_allclose(y.numpy()[pad], shared, rtol=1e-6, atol=1e-6)


def test_padding_content_changes_nothing_at_real_positions():
    layer = layer_with(*ALL_LOSSES)
    x, mod = batch()
    y1, aux1 = layer(paddle.to_tensor(x), None, paddle.to_tensor(mod))
    c1 = layer.step_counts.copy()
    x2 = x.copy()
    x2[mod < 0] = 100.0 * np.random.default_rng(9).normal(size=x2[mod < 0].shape)
    layer.step_counts[:] = 0
    y2, aux2 = layer(paddle.to_tensor(x2), None, paddle.to_tensor(mod))
    np.testing.assert_array_equal(layer.step_counts, c1)
    assert float(aux1) == float(aux2)
    np.testing.assert_array_equal(y1.numpy()[mod >= 0], y2.numpy()[mod >= 0])


def test_padding_gets_no_gradient_through_routing():
    layer = layer_with(*ALL_LOSSES)
    x, mod = batch()
    xt = paddle.to_tensor(x, stop_gradient=False)
    y, aux = layer(xt, None, paddle.to_tensor(mod))
    (y.sum() * 0 + aux).backward()  # only the balancing losses
    g = xt.grad.numpy()
    assert np.all(g[mod < 0] == 0) and np.any(g[mod >= 0] != 0)


def test_isolated_routing_skips_padding():
    layer = layer_with("model.moe.routing=isolated", "model.moe.vision_num_experts=4", "model.moe.vision_top_k=1",
                       "model.moe.vision_expert_ffn_size=4")
    x, mod = batch()
    layer(paddle.to_tensor(x), None, paddle.to_tensor(mod))
    real = mod[mod >= 0]
    text_tokens = np.isin(real, (0, 3)).sum()
    vision_tokens = np.isin(real, (1, 2)).sum()
    assert layer.step_counts[:E].sum() == text_tokens * K
    assert layer.step_counts[E:].sum() == vision_tokens * 1
    assert layer.modality_counts.sum() == text_tokens * K + vision_tokens


class SpyDispatcher:
    """Stands in for an expert-parallel dispatcher (not a LocalDispatcher): counts calls and the rows sent."""

    def __init__(self):
        from ernie5.model.dispatch import LocalDispatcher

        self.inner, self.rows = LocalDispatcher(), []

    def __call__(self, x_TH, ids, w, counts, fn):
        self.rows.append(int(x_TH.shape[0]))
        return self.inner(x_TH, ids, w, counts, fn)


@pytest.mark.parametrize("isolated", [False, True])
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_all_padding_micro_batch(isolated, expert_parallel):
    """Nothing counted, no balancing loss, shared experts only; under expert parallelism (a non-local dispatcher)
    the dispatcher is still called once per router group so every rank joins the all-to-all, with weight 0; with
    local experts no expert runs and none gets a gradient (as when no token reaches it)."""
    extra = ("model.moe.routing=isolated", "model.moe.vision_num_experts=4", "model.moe.vision_top_k=1",
             "model.moe.vision_expert_ffn_size=4") if isolated else ()
    layer = layer_with(*ALL_LOSSES[:2], *extra)
    spy = SpyDispatcher()
    if expert_parallel:
        layer.dispatcher = spy
    x = np.random.default_rng(1).normal(size=(1, 4, H)).astype(np.float32)
    xt = paddle.to_tensor(x, stop_gradient=False)
    y, aux = layer(xt, None, paddle.to_tensor(np.full((1, 4), -1, np.int64)))
    assert layer.step_counts.sum() == 0 and aux is None
    np.testing.assert_allclose(y.numpy()[0], layer.shared(paddle.to_tensor(x[0])).numpy(), rtol=1e-6, atol=1e-6)
    y.sum().backward()
    expert_grads = [p.grad for e in layer.experts for p in e.parameters()]
    if expert_parallel:
        assert spy.rows == [1]  # one placeholder row through the dispatcher
    else:
        assert all(g is None for g in expert_grads) and layer.router.weight.grad is None


def test_without_padding_the_sequence_loss_is_unchanged():
    """No padding: the plain [B, S] formula (row_T None) and the per-row one agree."""
    layer = layer_with("model.moe.seq_aux_loss_coef=1.0")
    x, _ = batch()
    mod = np.zeros((2, 6), np.int64)
    _, aux = layer(paddle.to_tensor(x), None, paddle.to_tensor(mod))
    logits = x.reshape(12, H) @ layer.router.weight.numpy()
    probs = np_softmax(logits)
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :K].reshape(2, 6, K)
    seq = np.mean([np.sum(np.bincount(ids[b].ravel(), minlength=E) * E / (K * 6) * probs.reshape(2, 6, E)[b].mean(0))
                   for b in range(2)])
    np.testing.assert_allclose(float(aux), seq, rtol=1e-5)
