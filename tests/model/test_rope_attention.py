"""Uni-RoPE against a NumPy reference; the relative-position property; document-causal attention."""

import numpy as np
import paddle
import paddle.nn.functional as F

from ernie5.runconfig import load_config
from ernie5.model.attention import Attention, document_causal_mask
from ernie5.model.rope import apply_rope, frequency_table, pair_axes, rope_cos_sin, text_positions


def np_rope_1d(x_SND, pos_S, theta):
    """Interleaved 1-D RoPE written out channel pair by channel pair."""
    S, N, D = x_SND.shape
    out = np.empty_like(x_SND)
    for i in range(D // 2):
        ang = pos_S * theta ** (-2.0 * i / D)
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = x_SND[:, :, 2 * i], x_SND[:, :, 2 * i + 1]
        out[:, :, 2 * i], out[:, :, 2 * i + 1] = a * c - b * s, a * s + b * c
    return out


def rope(x_BSND, pos_BS3, D, theta, sections):
    table = paddle.to_tensor(frequency_table(D, theta, sections))
    cos, sin = rope_cos_sin(paddle.to_tensor(pos_BS3), table)
    return apply_rope(paddle.to_tensor(x_BSND), cos, sin).numpy()


def test_uni_rope_with_equal_thw_is_exactly_1d_rope():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 11, 3, 16)).astype(np.float32)
    pos = np.arange(11)
    got = rope(x, np.repeat(pos[None, :, None], 3, 2), 16, 10000.0, [2, 3, 3])
    np.testing.assert_allclose(got[0], np_rope_1d(x[0], pos.astype(np.float64), 10000.0), atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(1, 1, 1, 32)).astype(np.float32), rng.normal(size=(1, 1, 1, 32)).astype(np.float32)

    def score(m, n):
        pm, pn = np.full((1, 1, 3), m), np.full((1, 1, 3), n)
        return float((rope(q, pm, 32, 1e4, [4, 6, 6]) * rope(k, pn, 32, 1e4, [4, 6, 6])).sum())

    assert abs(score(7, 3) - score(104, 100)) < 1e-4
    assert abs(score(7, 3) - score(7, 5)) > 1e-3


def test_section_layout_matches_ernie45_vl():
    axes = pair_axes([20, 22, 22])  # 64 pairs: h, w alternate over the first 44, t takes the last 20
    assert list(axes[:4]) == [1, 2, 1, 2] and (axes[44:] == 0).all() and (axes == 1).sum() == 22
    table = frequency_table(128, 1e6, [20, 22, 22])
    assert ((table != 0).sum(0) == 1).all()  # each pair reads exactly one axis


def test_visual_positions_rotate_h_and_w_sections_independently():
    x = np.ones((1, 1, 1, 16), dtype=np.float32)
    base = rope(x, np.array([[[0, 0, 0]]]), 16, 100.0, [2, 3, 3])
    moved_w = rope(x, np.array([[[0, 0, 5]]]), 16, 100.0, [2, 3, 3])
    changed_pairs = np.abs(moved_w - base).reshape(8, 2).max(1) > 1e-6
    np.testing.assert_array_equal(changed_pairs, pair_axes([2, 3, 3]) == 2)


def test_text_positions_restart_per_document():
    seg = np.array([[0, 0, 0, 1, 1, 2]])
    np.testing.assert_array_equal(text_positions(seg)[0, :, 0], [0, 1, 2, 0, 1, 0])


def test_document_mask_equals_brute_force_rule():
    seg = np.array([[0, 0, 1, 1, 1, 2, 2], [5, 5, 5, 5, 5, 5, 5]])
    mask = document_causal_mask(paddle.to_tensor(seg)).numpy()[:, 0]
    for b in range(2):
        for i in range(7):
            for j in range(7):
                allowed = j <= i and seg[b, i] == seg[b, j]
                assert (mask[b, i, j] == 0) == allowed and (mask[b, i, j] == -np.inf) == (not allowed)


def test_gqa_attention_matches_manual_reference():
    cfg = load_config(None, ["model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2",
                             "model.num_layers=2"]).model
    paddle.seed(0)
    attn = Attention(cfg)
    B, S, D = 2, 6, 8
    x = paddle.to_tensor(np.random.default_rng(2).normal(size=(B, S, 32)).astype(np.float32))
    seg = paddle.to_tensor(np.array([[0, 0, 0, 1, 1, 1]] * 2))
    pos = paddle.to_tensor(text_positions(seg.numpy()))
    cos, sin = rope_cos_sin(pos, paddle.to_tensor(frequency_table(D, cfg.rope_theta, cfg.sections_thw)))
    mask = document_causal_mask(seg)
    got = attn(x, cos, sin, mask).numpy()
    q = apply_rope(attn.q_proj(x).reshape([B, S, 4, D]), cos, sin).transpose([0, 2, 1, 3])
    k = apply_rope(attn.k_proj(x).reshape([B, S, 2, D]), cos, sin).transpose([0, 2, 1, 3])
    v = attn.v_proj(x).reshape([B, S, 2, D]).transpose([0, 2, 1, 3])
    heads = []
    for h in range(4):  # query head h reads kv head h // 2
        p = F.softmax(q[:, h] @ k[:, h // 2].transpose([0, 2, 1]) / np.sqrt(D) + mask[:, 0], -1)
        heads.append(p @ v[:, h // 2])
    ref = attn.o_proj(paddle.stack(heads, 2).reshape([B, S, 32])).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
