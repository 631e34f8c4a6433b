"""The scale-wise attention mask on a packed row holding text, a two-frame video (two scales per frame), text, and
a second document. The expected mask is written from the layout by hand, not from the code's groups."""

import numpy as np
import paddle

from ernie5.data.sequence import (TEXT, VIDEO, Segment, allowed_mask, build_document, dense_mask, expand_flashmask,
                                  flashmask_ranges, pack_documents, special_ids)
from ernie5.model.attention import group_mask

V = 100
SP = special_ids(V)

# Row layout (19 positions, no padding), index: content
#   0: text 5 | 1: BOV | 2: frame 1 scale 0 (1x1) | 3-6: frame 1 scale 1 (2x2) | 7: frame 1 context (1 position:
#   2x2 latent cells) | 8: frame 2 scale 0 | 9-12: frame 2 scale 1 | 13: frame 2 context | 14: EOV
#   15, 16: text 6, 7                                               -- document A (0..16)
#   17, 18: text 8, 9                                               -- document B
DOC_A, DOC_B = range(0, 17), range(17, 19)
F1S0, F1S1, F1C, F2S0, F2S1, F2C = [2], [3, 4, 5, 6], [7], [8], [9, 10, 11, 12], [13]
FRAME1, FRAME2 = F1S0 + F1S1 + F1C, F2S0 + F2S1 + F2C
SCALE_BLOCKS = [F1S0, F1S1, F1C, F2S0, F2S1, F2C]
TEXT_AFTER = [14, 15, 16]  # EOV and the text that follows the video


def _row():
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 2, (2, s, s, 2)).astype(np.uint8) for s in (1, 2)]  # [T=2, s, s, d=2]
    video = Segment("video", "target", codes=codes, scale_inputs=[rng.normal(size=(2, 2, 2, 2)).astype(np.float32)],
                    frame_latent=rng.normal(size=(2, 2, 2, 2)).astype(np.float32))
    a = build_document([Segment("text", ids=[5]), video, Segment("text", ids=[6, 7])], V, bits=2)
    b = build_document([Segment("text", ids=[8, 9])], V, bits=2)
    packed, dropped = pack_documents([a, b], 19)
    assert dropped == 0
    return packed


def _expected() -> np.ndarray:
    """allowed[i, j]: query i may read key j."""
    S = 19
    want = np.zeros((S, S), bool)
    for doc in (DOC_A, DOC_B):
        for i in doc:
            for j in doc:
                want[i, j] = j <= i  # causal inside a document; nothing across documents
    for block in SCALE_BLOCKS:  # every token of one scale of one frame sees the whole scale
        for i in block:
            for j in block:
                want[i, j] = True
    return want


def test_layout_is_the_one_the_expected_mask_assumes():
    p = _row()
    tok, mod = p["token"][0], p["modality"][0]
    assert tok[[0, 1, 14, 15, 16, 17, 18]].tolist() == [5, SP["<bov>"], SP["<eov>"], 6, 7, 8, 9]
    assert (mod[2:14] == VIDEO).all() and (mod[[0, 1, 14, 15, 16, 17, 18]] == TEXT).all()
    assert p["frame"][0, 2:14].tolist() == [0] * 6 + [1] * 6
    assert p["scale"][0, 2:14].tolist() == [0, 1, 1, 1, 1, 2, 0, 1, 1, 1, 1, 2]  # 2: the context group
    assert p["doc"][0].tolist() == [0] * 17 + [1] * 2


def test_scale_wise_mask_across_frames_text_and_documents():
    p = _row()
    want = _expected()
    # the rules, spelled out on the expected mask itself (guards the hand-built construction above)
    assert all(want[i, j] for blk in SCALE_BLOCKS for i in blk for j in blk)  # a scale sees itself fully
    assert want[np.ix_(F1S1, F1S0)].all() and not want[np.ix_(F1S0, F1S1)].any()  # earlier scale only
    assert want[np.ix_(FRAME2, FRAME1)].all()  # frame 2 sees all of frame 1
    assert not want[np.ix_(FRAME1, FRAME2)].any()  # frame 1 never sees frame 2
    assert want[np.ix_(TEXT_AFTER, range(0, 14))].all()  # text after the video sees everything before it
    assert not want[14, 15] and not want[15, 16] and want[16, 15]  # and is causal among itself
    assert not want[np.ix_(DOC_A, DOC_B)].any() and not want[np.ix_(DOC_B, DOC_A)].any()

    doc, grp = p["doc"], p["group"]
    got = {"allowed_mask": allowed_mask(doc, grp)[0],
           "dense_mask": dense_mask(doc, grp)[0, 0] == 0,
           "flashmask": expand_flashmask(flashmask_ranges(doc, grp))[0],
           # the mask the model's attention adds (built from tensors, as UnifiedModel.backbone does)
           "model group_mask": group_mask(paddle.to_tensor(doc.astype(np.int64)),
                                          paddle.to_tensor(grp.astype(np.int64))).numpy()[0, 0] == 0}
    for name, m in got.items():
        bad = np.argwhere(m != want)
        assert bad.size == 0, f"{name}: wrong at (query, key) {bad[:8].tolist()}"
    assert (dense_mask(doc, grp)[0, 0][~want] == -np.inf).all()
