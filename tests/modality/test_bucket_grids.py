"""Resolution buckets through the token grid: the scale schedule of a non-square latent, the quantiser on it, the
sequence layout (Uni-RoPE centre-aligned per axis), bit flips on a bucketed frame, and text -> image at a bucket."""

import numpy as np
import paddle
import pytest

from ernie5.data.sequence import IMAGE, Segment, build_document, pack_documents
from ernie5.modality.bitwise import resize, scale_schedule
from ernie5.modality.vision import VisionTokenizer, VisionTokenizerConfig

BITS = 2


def test_scale_schedule_by_hand():
    assert scale_schedule([1, 2, 4, 8], 8, 8) == [(1, 1), (2, 2), (4, 4), (8, 8)]  # the square: unchanged
    # 8 x 12 latent (a 2:3 bucket): each scale keeps s / 8 of each side, rounded half to even, at least 1
    assert scale_schedule([1, 2, 4, 8], 8, 12) == [(1, 2), (2, 3), (4, 6), (8, 12)]
    assert scale_schedule([1, 2, 4], 4, 2) == [(1, 1), (2, 1), (4, 2)]


def test_resize_non_square_is_area_average_and_bilinear():
    x = paddle.to_tensor(np.arange(24, dtype=np.float32).reshape(1, 1, 4, 6))
    down = resize(x, (2, 3)).numpy()[0, 0]  # 2x2 block means
    want = np.arange(24, dtype=np.float32).reshape(2, 2, 3, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(down, want, atol=1e-5)
    assert resize(x, (4, 6)) is x
    up = resize(paddle.to_tensor(np.ones((1, 1, 1, 2), np.float32)), (4, 6)).numpy()
    np.testing.assert_allclose(up, 1.0, atol=1e-6)


def _tok():
    paddle.seed(0)
    v = VisionTokenizer(VisionTokenizerConfig(in_channels=3, image_size=8, channels=8, downsample=1, bits=BITS,
                                              scales=[1, 2, 4]))
    v.eval()
    return v


def test_quantiser_on_a_bucket_follows_the_schedule_and_decodes_consistently():
    v = _tok()
    x = paddle.to_tensor(np.random.default_rng(0).uniform(-1, 1, (1, 3, 1, 8, 12)).astype(np.float32))  # 4 x 6 latent
    codes = v.encode(x)
    assert [tuple(c.shape[2:4]) for c in codes] == scale_schedule([1, 2, 4], 4, 6) == [(1, 2), (2, 3), (4, 6)]
    # the straight-through latent of the forward pass equals dequantising its codes (an exact invariant)
    f_st, _, _, _ = v._quantize(x)
    np.testing.assert_allclose(v.quantized_latent(codes).numpy(), f_st.numpy(), atol=1e-5)
    assert v.decode(codes).shape == [1, 3, 1, 8, 12]
    inputs = v.next_scale_inputs(codes)
    assert [tuple(t.shape[2:4]) for t in inputs] == [(2, 3), (4, 6)]


def test_layout_of_a_bucketed_image_is_centre_aligned_per_axis():
    d = BITS
    codes = [np.zeros((1, h, w, d), np.uint8) for h, w in [(1, 2), (2, 3), (4, 6)]]
    inputs = [np.zeros((1, h, w, d), np.float32) for h, w in [(2, 3), (4, 6)]]
    doc = build_document([Segment("text", ids=[5]), Segment("image", codes=codes, scale_inputs=inputs,
                                                            frame_latent=np.zeros((1, 4, 6, d), np.float32))],
                         100, bits=d)
    vis = np.nonzero(doc["modality"] == IMAGE)[0]
    start = 2  # text 5 and BOI take RoPE indices 0 and 1
    pos = doc["pos"][vis] - [start, start, start]
    scale = doc["scale"][vis]
    assert [int((scale == k).sum()) for k in range(4)] == [2, 6, 24, 6]  # 1x2, 2x3, 4x6, context 2x3
    # scale 0 (1 x 2 over a 4 x 6 latent): h at the middle 1.5, w at 1 and 4 ((j + 0.5) * 6 / 2 - 0.5)
    assert pos[scale == 0].tolist() == [[0, 1.5, 1.0], [0, 1.5, 4.0]]
    # scale 1 (2 x 3): h at 0.5 and 2.5, w at 0.5, 2.5, 4.5
    assert sorted({p[1] for p in pos[scale == 1]}) == [0.5, 2.5] and sorted({p[2] for p in pos[scale == 1]}) == [
        0.5, 2.5, 4.5]
    assert pos[scale == 2][7].tolist() == [0, 1, 1]  # the finest grid is the latent itself
    # what follows the image resumes at start + max(T, h, w) = start + 6 (here EOI, the document's last position)
    assert doc["pos"][vis[-1] + 1].tolist() == [start + 6] * 3 and vis[-1] + 2 == len(doc["pos"])


def test_bit_flips_on_a_bucketed_frame_match_the_tokenizer():
    from ernie5.data.media_tokenize import visual_history_maps
    from ernie5.objectives.unified import flip_history

    v = _tok()
    maps = {**visual_history_maps(v, (4, 6)), **visual_history_maps(v)}
    assert {k.split("/")[0] for k in maps} == {"4x6", "4x4"}
    x = paddle.to_tensor(np.random.default_rng(1).uniform(-1, 1, (1, 3, 1, 8, 12)).astype(np.float32))
    codes = [c.numpy()[0] for c in v.encode(x)]
    tc = [paddle.to_tensor(c[None]) for c in codes]
    inputs = [t.numpy()[0] for t in v.next_scale_inputs(tc)]
    latent = v.quantized_latent(tc).numpy()[0].transpose(1, 2, 3, 0)
    doc = build_document([Segment("text", ids=[1]), Segment("image", codes=codes, scale_inputs=inputs,
                                                            frame_latent=latent)], 100, bits=BITS)
    packed, _ = pack_documents([doc], 48)
    rows = {k: v_ for k, v_ in packed.items() if k != "und_table"}
    flipped = flip_history(rows, maps, [1, 2, 4], rate=1.0, rngs=[np.random.default_rng(0)])
    flip_t = [paddle.to_tensor((1 - c)[None]) for c in codes]  # every bit of every scale flipped
    want_in = v.next_scale_inputs(flip_t)
    want_ctx = v.quantized_latent(flip_t).numpy()[0, :, 0].transpose(1, 2, 0)  # [4, 6, d]
    sc = rows["scale"][0]
    for k in (1, 2):
        np.testing.assert_allclose(flipped[0, sc == k, :BITS], want_in[k - 1].numpy().reshape(-1, BITS), atol=1e-5)
    ctx = want_ctx.reshape(2, 2, 3, 2, BITS).transpose(0, 2, 1, 3, 4).reshape(6, 4 * BITS)
    np.testing.assert_allclose(flipped[0, sc == 3], ctx, atol=1e-5)
    # a grid the maps do not cover is an error, not a silent skip
    with pytest.raises(ValueError, match="4x6 latent grid"):
        flip_history(rows, visual_history_maps(v), [1, 2, 4], rate=0.5, rngs=[np.random.default_rng(0)])


def test_text_to_image_at_a_bucket():
    from tests.generation.test_generation import VOCAB, mm_model

    paddle.seed(3)
    v = VisionTokenizer(VisionTokenizerConfig(image_size=8, channels=8, downsample=1, bits=BITS, scales=[1, 2, 4]))
    v.eval()
    out = generate_image_at(mm_model(), v, (4, 6), VOCAB)
    assert [c.shape for c in out.codes] == [(1, 1, 1, 2, BITS), (1, 1, 2, 3, BITS), (1, 1, 4, 6, BITS)]
    assert out.context.shape == (6, 4 * BITS)
    assert v.decode([paddle.to_tensor(c) for c in out.codes]).shape == [1, 1, 1, 8, 12]


def generate_image_at(model, vision, grid, vocab):
    from ernie5.generation import generate_image

    a = generate_image(model, [5, 6], vocab, vision, temperature=0.0, grid=grid)
    b = generate_image(model, [5, 6], vocab, vision, temperature=0.0, grid=grid, use_cache=False)
    for x, y in zip(a.codes, b.codes):  # cached and recomputed agree on the bucket's layout too
        np.testing.assert_array_equal(x, y)
    return a
