"""Understanding inputs for video merge 2x2 patches over 4 frames (K = 16), images 2x2 (K = 4): the token layout,
and the patch merger ignoring the slots an image token does not use."""

import numpy as np
import paddle

from ernie5.constants import IMAGE, VIDEO
from ernie5.data.sequence import UND_PATCHES, Segment, build_document
from ernie5.model.multimodal import PatchMerger

V = 100


def test_video_understanding_tokens_merge_2x2_patches_over_4_frames():
    T, L, F = 6, 4, 3  # 6 frames: two chunks of 4, the second filled with the last frame twice
    und = np.arange(T * L * L * F, dtype=np.float32).reshape(T, L, L, F)
    d = build_document([Segment("video", "input", und=und), Segment("sep")], V)
    vid = np.nonzero(d["modality"] == VIDEO)[0]
    assert len(vid) == 2 * (L // 2) ** 2  # two chunks x 2x2 tokens
    table = d["und_table"]
    assert table.shape == (8, UND_PATCHES, F) and UND_PATCHES == 16
    # token (chunk 1, block row 1, block col 0): frames 4, 5, 5, 5 x cells (2..3, 0..1), order [frame, row, col]
    tok = table[d["und_index"][vid[6]]]
    want = np.stack([und[f, r, c] for f in (4, 5, 5, 5) for r in (2, 3) for c in (0, 1)])
    np.testing.assert_array_equal(tok, want)
    # one group per chunk; t at the chunk's middle frame, (h, w) at the 2x2 block centres
    assert len(set(d["group"][vid[:4]])) == 1 and d["group"][vid[4]] == d["group"][vid[3]] + 1
    start = d["pos"][vid[0], 1] - 0.5  # h of block row 0 is start + 0.5
    assert d["pos"][vid[0]].tolist() == [start + 1.5, start + 0.5, start + 0.5]
    assert d["pos"][vid[7]].tolist() == [start + 5.5, start + 2.5, start + 2.5]


def test_image_understanding_tokens_use_4_slots():
    und = np.random.default_rng(0).normal(size=(1, 4, 4, 5)).astype(np.float32)
    d = build_document([Segment("image", "input", und=und)], V)
    img = np.nonzero(d["modality"] == IMAGE)[0]
    table = d["und_table"][d["und_index"][img]]
    assert table.shape == (4, 16, 5)
    np.testing.assert_array_equal(table[1, :4], und[0, 0:2, 2:4].reshape(4, 5))  # block (0, 1)
    assert (table[:, 4:] == 0).all()


def test_merger_ignores_unused_slots():
    """An image token (4 of 16 slots) through the K = 16 merger equals an independent computation on just its 4
    CNN and 4 pixel vectors (slot embeddings 0..3 and 16..19, unmasked attention, plain mean); garbage in the
    unused slots changes nothing, and a video token uses all 16."""
    paddle.seed(0)
    m = PatchMerger(cnn_dim=3, pix_dim=2, patches=16, hidden=8, heads=2, std=0.5)
    m.eval()
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(3, 16, 5)).astype(np.float32)
    garbage = feats.copy()
    garbage[:, 4:] = rng.normal(size=(3, 12, 5)) * 100
    valid = paddle.to_tensor([4, 4, 4], dtype="int64")
    a = m(paddle.to_tensor(feats), valid).numpy()
    b = m(paddle.to_tensor(garbage), valid).numpy()
    np.testing.assert_allclose(a, b, atol=1e-5)
    f = paddle.to_tensor(feats[:, :4])
    x = paddle.concat([m.cnn_proj(f[:, :, :3]), m.pix_proj(f[:, :, 3:])], axis=1)
    x = x + paddle.concat([m.slot[:4], m.slot[16:20]], axis=0)
    x = x + m.attn(m.norm(x))
    ref = m.out_norm(m.out(x.mean(1))).numpy()
    np.testing.assert_allclose(a, ref, atol=1e-5)
    full = m(paddle.to_tensor(feats), paddle.to_tensor([16, 16, 16], dtype="int64")).numpy()
    np.testing.assert_allclose(full, m(paddle.to_tensor(feats)).numpy(), atol=1e-5)
    assert not np.allclose(full, a, atol=1e-3)


def test_mixed_image_and_video_tokens_merge_in_groups_in_their_own_order():
    """Image and video tokens interleaved: each token's merged vector equals merging it alone (its 4 or 16 slots),
    in the tokens' order, and gradients reach every token's features."""
    paddle.seed(0)
    m = PatchMerger(cnn_dim=3, pix_dim=2, patches=16, hidden=8, heads=2, std=0.5)
    m.eval()
    feats = paddle.to_tensor(np.random.default_rng(2).normal(size=(5, 16, 5)).astype(np.float32))
    feats.stop_gradient = False
    counts = [4, 16, 4, 16, 4]
    out = m(feats, paddle.to_tensor(counts, dtype="int64"))
    for i, k in enumerate(counts):
        alone = m(feats[i:i + 1], paddle.to_tensor([k], dtype="int64")).numpy()
        np.testing.assert_allclose(out.numpy()[i:i + 1], alone, atol=1e-5)
    out.sum().backward()
    g = np.abs(feats.grad.numpy()).sum(-1)  # [5, 16]: image tokens get gradient on slots 0..3 only
    for i, k in enumerate(counts):
        assert (g[i, :k] > 0).all() and (g[i, k:] == 0).all(), (i, k)


def test_what_follows_a_video_comes_after_its_last_chunk_in_time():
    for T, L in ((5, 4), (9, 4), (9, 8), (4, 8)):
        und = np.zeros((T, L, L, 3), np.float32)
        d = build_document([Segment("video", "input", und=und), Segment("sep")], V)
        vid = d["modality"] == VIDEO
        after = np.nonzero(vid)[0][-1] + 1  # EOV
        assert d["pos"][after, 0] > d["pos"][vid, 0].max(), (T, L)


def test_the_model_gives_video_tokens_16_slots_and_image_tokens_4():
    """Through `ModalityIO.embed`: changing slots 4..15 of the features moves a video token's input vector and
    leaves an image token's alone."""
    from ernie5.model.transformer import build_model
    from ernie5.objectives.config import ObjectiveConfig
    from ernie5.objectives.unified import make_unified_batch
    from tests.objectives.test_unified import BITS, LEVELS, tiny_cfg

    rng = np.random.default_rng(0)
    docs = [build_document([Segment("image", "input", und=rng.normal(size=(1, 2, 2, 7)).astype(np.float32))], V,
                           BITS, LEVELS),
            build_document([Segment("video", "input", und=rng.normal(size=(4, 2, 2, 7)).astype(np.float32))], V,
                           BITS, LEVELS)]
    from ernie5.data.sequence import pack_documents

    packed, _ = pack_documents(docs, 12)
    rows = {k: v for k, v in packed.items() if k != "und_table"}
    model = build_model(tiny_cfg(), seed=0)

    def embed(table):
        rows["und_feats"] = table
        b = make_unified_batch(rows, scales=[1, 2], audio_end=8, specials={"<eoa>": V + 5, "<boa>": V + 4},
                               mtp_depth=0, cfg=ObjectiveConfig())
        return model.io.embed(model.embed, {k: paddle.to_tensor(v) for k, v in b.items()}).numpy()[0]

    base = packed["und_table"]
    bumped = base.copy()
    bumped[:, 4:] += 1.0
    change = np.abs(embed(base) - embed(bumped)).max(-1)
    img, vid = packed["modality"][0] == IMAGE, packed["modality"][0] == VIDEO
    assert img.sum() == 1 and vid.sum() == 1
    assert change[img].max() < 1e-6 and change[vid].min() > 1e-4
