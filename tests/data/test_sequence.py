"""Unified sequence format: hand-built positions / groups / targets, the attention rule, FlashMask ranges."""

import numpy as np

from ernie5.data.sequence import (AUDIO, IMAGE, PAD, TEXT, Segment, allowed_mask, build_document, dense_mask,
                                  expand_flashmask, flashmask_ranges, pack_documents, special_ids)

V = 100  # text vocab size: specials are 100..106
SP = special_ids(V)


def _image_segment(role="target", bits=2):
    """Scales 1 and 2 of a one-frame image with 2 bits per token; latent side 2."""
    c1 = np.array([[[[1, 0]]]], np.uint8)  # [T=1, 1, 1, 2] -> id 1
    c2 = np.array([[[[0, 1], [1, 1]], [[0, 0], [1, 0]]]], np.uint8)  # ids 2 3 / 0 1
    inp = [np.full((1, 2, 2, bits), 0.5, np.float32)]
    latent = np.arange(8, dtype=np.float32).reshape(1, 2, 2, bits)  # [T, L, L, d]: cell (i, j) channel c = 4i + 2j + c
    return Segment("image", role, codes=[c1, c2], scale_inputs=inp, frame_latent=latent)


def test_hand_built_positions_groups_targets():
    segs = [Segment("text", "input", ids=[5, 6]), _image_segment("target"),
            Segment("audio", "target", audio_codes=np.array([[7, 8], [9, 10]])), Segment("sep"),
            Segment("text", "target", ids=[11])]
    d = build_document(segs, V, bits=2, levels=2)
    want_tokens = [5, 6, SP["<boi>"], 1, 2, 3, 0, 1, 0, SP["<eoi>"], SP["<boa>"], 7, 9, SP["<eoa>"], SP["<sep>"],
                   11]
    assert d["token"].tolist() == want_tokens
    assert d["modality"].tolist() == [TEXT] * 3 + [IMAGE] * 6 + [TEXT] * 2 + [AUDIO] * 2 + [TEXT] * 3
    # groups: one per text token, one per visual scale, one for the frame context, one per audio frame
    assert d["group"].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    # Uni-RoPE: image starts at 3; scale 1 (1x1) sits at the centre 0.5 of the 2x2 grid, and so does the one
    # context position (one 2x2 block of latent cells); resumes at 3 + max(T, L)
    pos = d["pos"].tolist()
    assert pos[:3] == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
    assert pos[3] == [3, 3.5, 3.5]
    assert pos[4:8] == [[3, 3, 3], [3, 3, 4], [3, 4, 3], [3, 4, 4]]
    assert pos[8] == [3, 3.5, 3.5]
    assert pos[9:] == [[5, 5, 5], [6, 6, 6], [7, 7, 7], [8, 8, 8], [9, 9, 9], [10, 10, 10], [11, 11, 11]]
    assert d["scale"].tolist()[3:9] == [0, 1, 1, 1, 1, 2]
    assert d["vis_in"].shape == (16, 8)  # 4d columns
    assert np.allclose(d["vis_in"][3], 0) and np.allclose(d["vis_in"][4:8, :2], 0.5)
    assert np.allclose(d["vis_in"][4:8, 2:], 0)
    # the context position holds the whole 2x2 latent: cells (0,0) (0,1) (1,0) (1,1), d = 2 channels each
    assert d["vis_in"][8].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    # targets: text/audio predict the next position; visual positions predict their own code; context: nothing
    t = d["target"].tolist()
    assert t[0] == 6 and t[1] == SP["<boi>"] and t[2] == -1 and t[3:8] == [1, 2, 3, 0, 1] and t[8] == -1
    assert t[10] == 7 and d["target_audio"][10].tolist() == [7, 8] and d["target_audio"][11].tolist() == [9, 10]
    lm = d["loss_mask"]
    assert lm[:, 1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1] + [0] * 8  # visual head on the target image's scales
    assert lm[:, 2].tolist() == [0] * 10 + [1, 1, 0, 0, 0, 0]  # BOA and frame 1 predict the next audio frame
    assert lm[0, 0] == 0 and lm[1, 0] == 1  # "6" is input text (no loss); BOI (target image) is predicted
    assert lm[8].tolist() == [0, 0, 0]  # the context position predicts nothing (not even EOI)
    assert lm[14, 0] == 1  # SEP predicts the target text


def _rule(doc, grp):
    S = len(doc)
    return np.array([[doc[i] == doc[j] and grp[j] <= grp[i] for j in range(S)] for i in range(S)])


def _packed():
    a = build_document([Segment("text", ids=[1, 2]), _image_segment()], V, bits=2)
    b = build_document([Segment("text", ids=[3]), _image_segment("input"), Segment("text", ids=[4, 5])], V, bits=2)
    c = build_document([Segment("text", ids=[9] * 30)], V, bits=2)  # longer than a row: dropped
    packed, dropped = pack_documents([a, b, c, a], 24)
    return packed, dropped


def test_packing_and_mask_equal_brute_force_rule():
    packed, dropped = _packed()
    assert dropped == 1 and packed["token"].shape == (2, 24)
    assert (np.diff(packed["group"], axis=1) >= 0).all()  # row-global, non-decreasing
    assert packed["modality"][1, -1] == PAD
    allowed = allowed_mask(packed["doc"], packed["group"])
    for b in range(2):
        assert (allowed[b] == _rule(packed["doc"][b], packed["group"][b])).all()
        assert allowed[b].diagonal().all()  # every row (padding too) sees itself: no all-masked softmax row
    dm = dense_mask(packed["doc"], packed["group"])
    assert dm.shape == (2, 1, 24, 24) and ((dm[:, 0] == 0) == allowed).all()
    # inside the image group (positions 4..7 of row 0) attention is bidirectional
    assert allowed[0, 4, 7] and allowed[0, 7, 4] and not allowed[0, 3, 4]


def test_flashmask_ranges_expand_to_the_same_mask():
    packed, _ = _packed()
    ranges = flashmask_ranges(packed["doc"], packed["group"])
    assert ranges.shape == (2, 1, 24, 2) and ranges.dtype == np.int32
    assert (expand_flashmask(ranges) == allowed_mask(packed["doc"], packed["group"])).all()


def test_dense_mask_works_with_cpu_attention():
    import paddle
    import paddle.nn.functional as F

    packed, _ = _packed()
    mask = paddle.to_tensor(dense_mask(packed["doc"], packed["group"]))
    q = paddle.randn([2, 24, 2, 8])
    out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert bool(paddle.isfinite(out).all())
