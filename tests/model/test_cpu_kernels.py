"""The CPU fast paths (issue 9) against the plain autograd definitions they replace: values and gradients.

The model-level tests run twice: with the fused C++ kernels (ernie5/kernels) and with Paddle's own ops (the
fallback when the kernels are off or cannot be built)."""

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from ernie5 import kernels
from ernie5.model.attention import document_causal_mask, group_mask, gqa_attention
from ernie5.model.layers import RMSNormFunction, rms_norm_reference
from ernie5.model.rope import apply_rope, frequency_table, rope_cos_sin
from ernie5.objectives.parallel_ce import IGNORE, chunked_ce


@pytest.fixture(params=["fused", "paddle_ops"])
def cpu_path(request):
    if request.param == "fused":
        yield request.param
    else:
        with kernels.disabled():
            yield request.param


def _grads(out, inputs, seed=0):
    g = paddle.to_tensor(np.random.default_rng(seed).normal(size=out.shape).astype(np.float32))
    return paddle.grad(out, inputs, g)


def _leaf(*shape, seed=0, scale=1.0):
    t = paddle.to_tensor((np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32))
    t.stop_gradient = False
    return t


def test_rms_norm_function_equals_autograd_definition():
    x, w = _leaf(3, 5, 16, seed=1), _leaf(16, seed=2)
    ref = rms_norm_reference(x, w, 1e-6)
    got = RMSNormFunction.apply(x, w, 1e-6)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(got, [x, w]), _grads(ref, [x, w])):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 1)])
def test_gqa_attention_equals_paddle_sdpa(heads, kv_heads, cpu_path):
    B, S, D = 2, 9, 8
    q, k, v = _leaf(B, S, heads, D, seed=1), _leaf(B, S, kv_heads, D, seed=2), _leaf(B, S, kv_heads, D, seed=3)
    segments = paddle.to_tensor(np.array([[0] * 4 + [1] * 5, [0] * 9]), dtype="int64")
    groups = paddle.to_tensor(np.array([[0, 1, 1, 2, 3, 3, 3, 4, 5], list(range(9))]), dtype="int64")
    for mask in (document_causal_mask(segments), group_mask(segments, groups)):
        got = gqa_attention(q, k, v, mask)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape([B, S, heads * D])
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
        for a, b in zip(_grads(got, [q, k, v]), _grads(ref, [q, k, v])):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_gqa_attention_with_more_keys_than_queries(cpu_path):
    """Incremental decoding: 3 new queries over 7 keys (mask [B, 1, 3, 7])."""
    B, Sq, Sk, N, K, D = 1, 3, 7, 4, 2, 8
    q, k, v = _leaf(B, Sq, N, D, seed=4), _leaf(B, Sk, K, D, seed=5), _leaf(B, Sk, K, D, seed=6)
    allowed = np.tril(np.ones((Sq, Sk), bool), k=Sk - Sq)
    mask = paddle.to_tensor(np.where(allowed, 0.0, -np.inf).astype(np.float32)[None, None])
    got = gqa_attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape([B, Sq, N * D])
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_apply_rope_equals_pairwise_rotation(cpu_path):
    B, S, N, D = 2, 5, 3, 8
    x = _leaf(B, S, N, D, seed=7)
    pos = paddle.to_tensor(np.random.default_rng(8).integers(0, 50, (B, S, 3)), dtype="int64")
    table = paddle.to_tensor(frequency_table(D, 10000.0, [2, 1, 1]))
    cos, ssin = rope_cos_sin(pos, table)
    got = apply_rope(x, cos, ssin)
    angles = pos.numpy().astype(np.float64) @ table.numpy().astype(np.float64)  # [B, S, D/2]
    xe, xo = x.numpy()[..., 0::2], x.numpy()[..., 1::2]
    c, s = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
    want = np.stack([xe * c - xo * s, xo * c + xe * s], -1).reshape(B, S, N, D)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    gx, = _grads(got, [x])  # rotation is orthogonal: the gradient is the inverse rotation of the upstream grad
    g = np.random.default_rng(0).normal(size=(B, S, N, D))
    ge, go = g[..., 0::2], g[..., 1::2]
    np.testing.assert_allclose(gx.numpy(), np.stack([ge * c + go * s, go * c - ge * s], -1).reshape(B, S, N, D),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sizes", [[5], [3, 4], [2, 2, 3]])
def test_chunked_ce_equals_cross_entropy(sizes):
    V = 11
    logits = _leaf(sum(sizes), V, seed=9, scale=3.0)
    labels_np = np.random.default_rng(10).integers(0, V, (sum(sizes), 1))
    labels_np[1, 0] = IGNORE
    labels = paddle.to_tensor(labels_np, dtype="int64")
    parts = paddle.split(logits, sizes) if len(sizes) > 1 else [logits]
    lab_parts = paddle.split(labels, sizes) if len(sizes) > 1 else [labels]
    got = paddle.concat(chunked_ce(parts, lab_parts))
    ref = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)
    assert got.numpy()[1, 0] == 0.0
    (a,), (b,) = _grads(got, [logits]), _grads(ref, [logits])
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert np.all(a.numpy()[1] == 0.0)  # an ignored row gets no gradient


def test_head_ce_equals_masked_mean_of_full_logits(tiny_cfg, monkeypatch, cpu_path):
    """The chunked head + CE gives the loss (against numpy) and gradients (against one full-logits autograd
    cross-entropy) of the mean over labelled positions (3 uneven chunks)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    from ernie5.model.transformer import build_model
    from ernie5.objectives.text import head_ce

    cfg = tiny_cfg("model.vocab_size=97")
    model = build_model(cfg.model, seed=0)
    h = _leaf(2, 7, cfg.model.hidden_size, seed=11)
    labels_np = np.random.default_rng(12).integers(0, cfg.model.vocab_size, (2, 7))
    labels_np[0, 3] = labels_np[1, 6] = IGNORE
    labels = paddle.to_tensor(labels_np, dtype="int64")
    got, n_got = head_ce(model, h, labels)
    logits = model.logits(h)
    lp = logits.numpy().astype(np.float64)
    lp = lp - np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lp.max(-1, keepdims=True)
    valid = labels_np != IGNORE
    want = -np.mean([lp[b, s, labels_np[b, s]] for b in range(2) for s in range(7) if valid[b, s]])
    assert n_got == 12
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    per_row = F.cross_entropy(logits.reshape([14, -1]), labels.reshape([14, 1]), ignore_index=IGNORE, reduction="none")
    ref = per_row.sum() / 12
    params = [h, model.embed.weight, model.norm.weight]
    for a, b in zip(paddle.grad(got, params), paddle.grad(ref, params)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-7)


def test_mask_built_on_host_equals_the_device_ops():
    """CPU masks come from NumPy; the Paddle-op version (accelerators) must give the same mask."""
    from ernie5.model.attention import _mask_on_device, _mask_on_host

    segments = paddle.to_tensor(np.array([[0] * 4 + [1] * 5, [0] * 9]), dtype="int64")
    groups = paddle.to_tensor(np.array([[0, 1, 1, 2, 3, 3, 3, 4, 5], list(range(9))]), dtype="int64")
    causal = paddle.arange(9, dtype="int64").unsqueeze(0)
    for g in (causal, groups):
        host, device = _mask_on_host(segments, g, segments, g).numpy(), _mask_on_device(segments, g, segments, g).numpy()
        assert host.shape == device.shape == (2, 1, 9, 9) and host.dtype == device.dtype
        np.testing.assert_array_equal(host, device)
        # incremental decoding: the last 3 positions as queries against all 9 keys
        q = (segments[:, -3:], g[:, -3:])
        host, device = _mask_on_host(*q, segments, g).numpy(), _mask_on_device(*q, segments, g).numpy()
        assert host.shape == device.shape == (2, 1, 3, 9)
        np.testing.assert_array_equal(host, device)


def test_key_spans_hold_every_allowed_key_and_no_more():
    """`mask.key_spans` against brute force on packed rows with groups and expiring keys: every allowed (query,
    key) pair lies inside its tile's span, and each span's ends are allowed for some query of the tile."""
    from ernie5.model import mask as M

    rng = np.random.default_rng(11)
    B, S, tile = 3, 40, 8
    doc = np.sort(rng.integers(0, 5, (B, S)), axis=1)
    group = np.cumsum(rng.random((B, S)) < 0.6, axis=1)  # runs of positions share a group (bidirectional inside)
    until = np.where(rng.random((B, S)) < 0.2, group + 3, M.NEVER)
    allowed = M.allowed(doc, group, doc, group, until)
    spans = M.key_spans(allowed, tile)
    assert [(q0, q1) for q0, q1, _, _ in spans] == [(q, q + tile) for q in range(0, S, tile)]
    for q0, q1, k0, k1 in spans:
        keys = np.flatnonzero(allowed[:, q0:q1].any(axis=(0, 1)))
        assert (k0, k1) == (keys.min(), keys.max() + 1)
    empty = np.zeros((1, 16, 10), bool)  # no query may attend anything: the tile keeps every key
    assert M.key_spans(empty, 8) == ((0, 8, 0, 10), (8, 16, 0, 10))


def test_gqa_attention_over_key_spans_equals_the_whole_square(cpu_path):
    """A host mask of >= 2 query tiles carries key spans and attention runs tile by tile; the result and the
    gradients equal the whole-square computation (the same mask without spans) and Paddle's SDPA."""
    from ernie5.model.attention import QUERY_TILE

    rng = np.random.default_rng(12)
    B, S, N, K, D = 2, 2 * QUERY_TILE + 40, 4, 2, 8
    docs = np.sort(rng.integers(0, 6, (B, S)), axis=1)
    groups = np.cumsum(rng.random((B, S)) < 0.7, axis=1)
    mask = group_mask(paddle.to_tensor(docs), paddle.to_tensor(groups))
    assert len(mask.key_spans) == 3 and any(k1 - k0 < S for _, _, k0, k1 in mask.key_spans)
    bare = paddle.to_tensor(mask.numpy())  # same values, no spans
    assert getattr(bare, "key_spans", None) is None
    q, k, v = _leaf(B, S, N, D, seed=13), _leaf(B, S, K, D, seed=14), _leaf(B, S, K, D, seed=15)
    import ernie5.model.attention as A

    seen, real = [], A._gqa_dense
    with pytest.MonkeyPatch.context() as mp:  # the tiles really run: one call per span, with its shapes
        mp.setattr(A, "_gqa_dense", lambda q_, k_, v_, m_: seen.append((q_.shape[1], k_.shape[1])) or real(q_, k_, v_, m_))
        got = gqa_attention(q, k, v, mask)
    assert seen == [(q1 - q0, k1 - k0) for q0, q1, k0, k1 in mask.key_spans]
    whole = gqa_attention(q, k, v, bare)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bare).reshape([B, S, N * D])
    # fp32 softmax over the same nonzero terms in another grouping: ~1e-7 relative
    np.testing.assert_allclose(got.numpy(), whole.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(got, [q, k, v]), _grads(whole, [q, k, v])):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_key_spans_of_a_prefill_after_cached_keys():
    """Incremental decoding: 300 new queries against 40 cached + 300 new keys ([B, 1, 300, 340]); the spans
    index the concatenated keys and the tiled result equals the whole square."""
    from ernie5.model.attention import KVCache, QUERY_TILE

    B, N, K, D = 2, 4, 2, 8
    cache = KVCache(1)
    cache.extend(paddle.to_tensor(np.zeros((B, 40), np.int64)))
    segs = np.repeat(np.array([[0] * 100 + [1] * 200]), B, axis=0)  # the first 100 new positions continue doc 0
    mask = cache.extend(paddle.to_tensor(segs))
    assert mask.shape == [B, 1, 300, 340] and mask.key_spans[0][1] == QUERY_TILE
    assert mask.key_spans[0][2] == 0 and mask.key_spans[1][2] == 140  # tile 2 starts in doc 1 (key 40 + 100)
    q, k, v = _leaf(B, 300, N, D, seed=16), _leaf(B, 340, K, D, seed=17), _leaf(B, 340, K, D, seed=18)
    np.testing.assert_allclose(gqa_attention(q, k, v, mask).numpy(),
                               gqa_attention(q, k, v, paddle.to_tensor(mask.numpy())).numpy(), rtol=1e-5, atol=1e-6)


def test_spans_that_do_not_fit_are_ignored():
    """A mask whose spans do not match the call's shapes (stale, or reused) is computed whole."""
    B, S, N, K, D = 1, 300, 2, 1, 4
    mask = document_causal_mask(paddle.to_tensor(np.zeros((B, S), np.int64)))
    q, k, v = _leaf(B, S, N, D, seed=20), _leaf(B, S, K, D, seed=21), _leaf(B, S, K, D, seed=22)
    ref = gqa_attention(q, k, v, paddle.to_tensor(mask.numpy())).numpy()
    bad = ((0, 100, 0, 100), (100, S, 0, S + 50))  # a key span past the keys
    np.testing.assert_allclose(gqa_attention(q, k, v, mask, bad).numpy(), ref, rtol=1e-5, atol=1e-6)
