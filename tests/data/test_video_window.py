"""The video recipe's attention: windowed temporal attention and old-frame masking, against masks written by hand
from the row layout (positions of each frame), not from the code's groups."""

import numpy as np
import paddle
import pytest

from ernie5.data.sequence import (Segment, allowed_mask, build_document, dense_mask, expand_flashmask,
                                  flashmask_ranges, frame_until, pack_documents)
from ernie5.model.attention import KVCache, group_mask
from ernie5.model.mask import NEVER
from ernie5.objectives.config import ObjectiveConfig
from ernie5.objectives.unified import make_unified_batch

V = 100
T = 4  # frames; scales 1x1 and 2x2, latent 2x2: per frame 1 + 4 positions and a 1-position context group
# Row layout (28 positions, one document): 0: text 5 | 1: BOV | frame f: 2 + 6f .. 7 + 6f (scale 0 at 2 + 6f,
# scale 1 at 3 + 6f .. 6 + 6f, context at 7 + 6f) | 26: EOV | 27: text 6
S = 28
FRAME_START = [2 + 6 * f for f in range(T)]
BLOCKS = [[s] for s in FRAME_START] + [list(range(s + 1, s + 5)) for s in FRAME_START] + \
    [[s + 5] for s in FRAME_START]


def _row():
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 2, (T, s, s, 2)).astype(np.uint8) for s in (1, 2)]
    video = Segment("video", "target", codes=codes, scale_inputs=[rng.normal(size=(T, 2, 2, 2)).astype(np.float32)],
                    frame_latent=rng.normal(size=(T, 2, 2, 2)).astype(np.float32))
    doc = build_document([Segment("text", ids=[5]), video, Segment("text", ids=[6])], V, bits=2)
    packed, dropped = pack_documents([doc], S)
    assert dropped == 0 and packed["token"].shape == (1, S)
    return packed


def _frame_of(i: int) -> int:
    return (i - 2) // 6 if 2 <= i < 26 else -1


def _expected(expire_at: dict) -> np.ndarray:
    """Causal with every scale block (and context group) bidirectional; a key of frame f is hidden from every
    position >= expire_at[f] (a position index: the first position of a later frame)."""
    want = np.tril(np.ones((S, S), bool))
    for blk in BLOCKS:
        for i in blk:
            for j in blk:
                want[i, j] = True
    for j in range(S):
        f = _frame_of(j)
        if f in expire_at:
            want[expire_at[f]:, j] = False
    return want


def _check(p, until, want):
    doc, grp = p["doc"], p["group"]
    got = {"allowed_mask": allowed_mask(doc, grp, until)[0],
           "dense_mask": dense_mask(doc, grp, until)[0, 0] == 0,
           "flashmask": expand_flashmask(flashmask_ranges(doc, grp, until))[0],
           "model group_mask": group_mask(paddle.to_tensor(doc.astype(np.int64)), paddle.to_tensor(grp.astype(np.int64)),
                                          paddle.to_tensor(until)).numpy()[0, 0] == 0}
    for name, m in got.items():
        bad = np.argwhere(m != want)
        assert bad.size == 0, f"{name}: wrong at (query, key) {bad[:8].tolist()}"


def test_layout():
    p = _row()
    assert [int(p["scale"][0, s]) for s in FRAME_START] == [0] * T
    assert [int(p["scale"][0, s + 5]) for s in FRAME_START] == [2] * T  # the context groups
    assert p["frame"][0, 2:26].tolist() == [f for f in range(T) for _ in range(6)]


@pytest.mark.parametrize("window", [1, 2, 3])
def test_windowed_temporal_attention(window):
    p = _row()
    until = frame_until(p["doc"], p["group"], p["frame"], p["scale"], p["modality"], window)
    # frame f is seen by frames f .. f + W - 1; from frame f + W on (and after the video) it is gone
    want = _expected({f: FRAME_START[f + window] for f in range(T) if f + window < T})
    _check(p, until, want)
    assert (until[0, :2] == NEVER).all() and (until[0, 26:] == NEVER).all()  # text never expires
    if window == 1:  # a frame sees only itself: frame 1 does not see frame 0, the text after sees only frame 3
        assert not want[FRAME_START[1], 2] and want[27, FRAME_START[3]] and not want[27, FRAME_START[2]]


def test_no_window_keeps_every_frame():
    p = _row()
    until = frame_until(p["doc"], p["group"], p["frame"], p["scale"], p["modality"], 0)
    assert (until == NEVER).all()
    _check(p, until, _expected({}))


def test_old_frame_masking_hides_a_frame_from_two_frames_on():
    p = _row()
    hide = [[np.array([False, True, False, True])]]  # frames 1 and 3 drawn; frame 3 has no frame 5: no effect
    until = frame_until(p["doc"], p["group"], p["frame"], p["scale"], p["modality"], 0, hide)
    _check(p, until, _expected({1: FRAME_START[3]}))
    # combined with a window of 3: frame 0 leaves at frame 3, frame 1 (hidden) too
    until = frame_until(p["doc"], p["group"], p["frame"], p["scale"], p["modality"], 3, hide)
    _check(p, until, _expected({0: FRAME_START[3], 1: FRAME_START[3]}))


def test_kv_cache_with_until_equals_the_full_mask():
    p = _row()
    until = frame_until(p["doc"], p["group"], p["frame"], p["scale"], p["modality"], 2)
    t = {k: paddle.to_tensor(v.astype(np.int64)) for k, v in (("doc", p["doc"]), ("group", p["group"]))}
    full = group_mask(t["doc"], t["group"], paddle.to_tensor(until)).numpy()[0, 0]
    cache = KVCache(1)
    cuts = [0, 2, 8, 14, 20, 26, S]  # text + BOV, then a frame at a time, then EOV + text
    rows = [cache.extend(t["doc"][:, a:b], t["group"][:, a:b], paddle.to_tensor(until[:, a:b])).numpy()[0, 0]
            for a, b in zip(cuts, cuts[1:])]
    for (a, b), m in zip(zip(cuts, cuts[1:]), rows):
        np.testing.assert_array_equal(m, full[a:b, :b])


def test_batches_carry_until_only_when_asked_and_hide_draws_follow_the_row_key():
    p = _row()
    rows = {k: v for k, v in p.items() if k != "und_table"}
    rows["und_feats"] = np.zeros((0, 16, 7), np.float32)
    kw = dict(scales=[1, 2], audio_end=8, specials={"<eoa>": V + 5, "<boa>": V + 4}, mtp_depth=0)
    assert "until" not in make_unified_batch(rows, cfg=ObjectiveConfig(), **kw)
    b = make_unified_batch(rows, cfg=ObjectiveConfig(), temporal_window=2, **kw)
    np.testing.assert_array_equal(b["until"], frame_until(p["doc"], p["group"], p["frame"], p["scale"],
                                                          p["modality"], 2))
    cfg = ObjectiveConfig(old_frame_mask_rate=0.5)
    assert "until" not in make_unified_batch(rows, cfg=cfg, row_keys=[3], **kw)  # evaluation: no hiding
    draws = {tuple(make_unified_batch(rows, cfg=cfg, row_keys=[k], train=True, **kw)["until"][0]) for k in range(12)}
    assert len(draws) >= 2  # frames 0 and 1 can be drawn: different keys give different masks
    again = make_unified_batch(rows, cfg=cfg, row_keys=[5], train=True, **kw)["until"]
    np.testing.assert_array_equal(again, make_unified_batch(rows, cfg=cfg, row_keys=[5], train=True, **kw)["until"])


@pytest.mark.parametrize("layers", [1, 2])
def test_model_frame_outside_the_window_has_no_influence(layers):
    """Through the whole model with W = 2: changing frame 0's inputs changes frame 1; one layer lets nothing reach
    frame 2 on; each further layer can relay it one window further (frame 0 -> 1 -> 2 with two layers, as in any
    sliding-window attention), never beyond. Without a window it reaches the end of the row."""
    from ernie5.model.transformer import build_model
    from tests.objectives.test_unified import tiny_cfg

    p = _row()
    cfg = tiny_cfg()
    cfg.num_layers = layers
    cfg.multimodal.num_scales, cfg.multimodal.visual_bits, cfg.multimodal.audio_levels = 2, 2, 1
    model = build_model(cfg, seed=0)
    model.eval()
    rows = {k: v for k, v in p.items() if k != "und_table"}
    rows["und_feats"] = np.zeros((0, 16, 7), np.float32)
    kw = dict(scales=[1, 2], audio_end=8, specials={"<eoa>": V + 5, "<boa>": V + 4}, mtp_depth=0, cfg=ObjectiveConfig())

    def hidden(window, bump):
        b = make_unified_batch(rows, temporal_window=window, **kw)
        b["vis_in"] = b["vis_in"].copy()
        b["vis_in"][0, 3:8] += bump  # frame 0's scale-1 and context inputs
        t = {k: paddle.to_tensor(v) for k, v in b.items()}
        return model.backbone(None, t["pos"], t["doc"], embeds_BSH=model.embed_unified(t), groups_BS=t["group"],
                              modality_BS=t["modality"], until_BS=t.get("until")).hidden_BSH.numpy()[0]

    for window in (2, 0):
        change = np.abs(hidden(window, 0.0) - hidden(window, 3.0)).max(-1)
        assert (change[FRAME_START[1]:FRAME_START[2]] > 1e-5).all()  # frame 1 sees frame 0
        if window == 2:
            reach = FRAME_START[1 + layers]  # first position that no chain of in-window attention reaches
            assert change[reach:].max() < 1e-6
            if layers == 2:
                assert (change[FRAME_START[2]:FRAME_START[3]] > 1e-5).all()
        else:
            assert (change[FRAME_START[2]:] > 1e-5).all()
