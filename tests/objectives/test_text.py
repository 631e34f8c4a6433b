"""NTP / MTP targets from packed rows, and the masked loss."""

import numpy as np
import paddle
import paddle.nn.functional as F

from ernie5.objectives.text import IGNORE, make_text_batch


def test_targets_shift_per_depth_and_stop_at_document_and_row_ends():
    tokens = np.array([[10, 11, 12, 3, 20, 21, 22]])  # doc A = 10 11 12 EOS(3), doc B = 20 21 22
    seg = np.array([[0, 0, 0, 0, 1, 1, 1]])
    b = make_text_batch(tokens, seg, mtp_depth=2)
    np.testing.assert_array_equal(b["input_ids"], [[10, 11, 12, 3, 20, 21]])
    np.testing.assert_array_equal(b["labels_0"], [[11, 12, 3, IGNORE, 21, 22]])
    np.testing.assert_array_equal(b["labels_1"], [[12, 3, IGNORE, IGNORE, 22, IGNORE]])
    np.testing.assert_array_equal(b["labels_2"], [[3, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]])
    np.testing.assert_array_equal(b["mtp_ids_1"], [[11, 12, 3, 20, 21, 22]])  # x_{t+1}
    np.testing.assert_array_equal(b["mtp_ids_2"], [[12, 3, 20, 21, 22, 0]])  # x_{t+2}, padded
    np.testing.assert_array_equal(b["positions"][0, :, 0], [0, 1, 2, 3, 0, 1])


def test_mtp_loss_uses_shifted_targets(tiny_cfg):
    """The MTP-1 loss of a model equals CE of its MTP logits against tokens two ahead."""
    from ernie5.model.transformer import build_model, to_tensor_batch
    from ernie5.objectives.text import text_loss

    cfg = tiny_cfg("model.vocab_size=50")
    model = build_model(cfg.model, seed=0)
    model.eval()
    rng = np.random.default_rng(1)
    tokens, seg = rng.integers(0, 50, (2, 9)), np.zeros((2, 9), dtype=np.int64)
    batch = to_tensor_batch(make_text_batch(tokens, seg, 1))
    out = text_loss(model, batch, mtp_weight=0.5)
    bb = model.backbone(batch["input_ids"], batch["positions"], batch["segment_ids"])
    h1 = model.mtp_hidden(1, bb.hidden_BSH, model.embed(paddle.to_tensor(tokens[:, 1:9])), bb)
    logits = model.logits(h1).numpy()[:, :7]  # positions whose t+2 lies in the row
    ce = F.cross_entropy(paddle.to_tensor(logits.reshape(-1, 50)), paddle.to_tensor(tokens[:, 2:9].reshape(-1, 1)))
    np.testing.assert_allclose(out.terms["loss_mtp_1"], float(ce), rtol=1e-5)
    np.testing.assert_allclose(float(out.total), out.terms["loss_ntp"] + 0.5 * out.terms["loss_mtp_1"], rtol=1e-5)


def test_targets_by_hand_two_rows_several_documents():
    """Depth k at input position t predicts token t+1+k of the row, IGNORE when that token lies in another
    document or past the row end. Every expected entry below is written out by hand from the rows."""
    I = IGNORE
    tokens = np.array([[10, 11, 12, 13, 3, 20, 21, 22, 23],  # doc 0 = 10 11 12 13 EOS, doc 1 = 20 21 22 23
                       [30, 31, 3, 40, 3, 50, 51, 52, 53]])  # docs: 30 31 EOS | 40 EOS | 50 51 52 53
    seg = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 1],
                    [0, 0, 0, 1, 1, 2, 2, 2, 2]])
    b = make_text_batch(tokens, seg, mtp_depth=2)
    np.testing.assert_array_equal(b["input_ids"], [[10, 11, 12, 13, 3, 20, 21, 22], [30, 31, 3, 40, 3, 50, 51, 52]])
    np.testing.assert_array_equal(b["segment_ids"], seg[:, :8])
    # depth 0 (next token): row 0 position 4 (EOS of doc 0) would predict 20 of doc 1 -> IGNORE
    np.testing.assert_array_equal(b["labels_0"], [[11, 12, 13, 3, I, 21, 22, 23],
                                                  [31, 3, I, 3, I, 51, 52, 53]])
    # depth 1 (two ahead): row 0 t=3 -> 20 (doc 1), t=4 -> 21 (doc 1), t=7 -> past the row (index 9)
    #                      row 1 t=1 -> 40 (doc 1), t=2 -> EOS of doc 1, t=3 -> 50, t=4 -> 51, t=7 -> past
    np.testing.assert_array_equal(b["labels_1"], [[12, 13, 3, I, I, 22, 23, I],
                                                  [3, I, I, I, I, 52, 53, I]])
    # depth 2 (three ahead): row 0 t=2..4 cross into doc 1, t=6, 7 are past the row
    #                        row 1: only t=5 (50 -> 53) stays inside one document
    np.testing.assert_array_equal(b["labels_2"], [[13, 3, I, I, I, 23, I, I],
                                                  [I, I, I, I, I, 53, I, I]])
    # MTP inputs: depth k embeds x_{t+k}, zero past the row
    np.testing.assert_array_equal(b["mtp_ids_1"], [[11, 12, 13, 3, 20, 21, 22, 23], [31, 3, 40, 3, 50, 51, 52, 53]])
    np.testing.assert_array_equal(b["mtp_ids_2"], [[12, 13, 3, 20, 21, 22, 23, 0], [3, 40, 3, 50, 51, 52, 53, 0]])
    np.testing.assert_array_equal(b["positions"][:, :, 0], [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 0, 1, 0, 1, 2]])


def test_unified_mtp_labels_by_hand():
    """Unified rows: labels_0 is the text target where the text head has a loss; labels_k at t is labels_0 at t+k
    when t+k is in the same document, else IGNORE (and IGNORE past the row). Written out by hand."""
    from ernie5.objectives.config import ObjectiveConfig
    from ernie5.objectives.unified import make_unified_batch

    I = IGNORE
    S, L, d = 10, 2, 2
    doc = np.array([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    target = np.array([[11, 12, 13, 14, 15, -1, 21, 22, 23, -1]])
    text_head = np.array([[1, 1, 0, 1, 1, 0, 1, 1, 1, 0]])  # position 2 is understanding input: no loss
    loss_mask = np.zeros((1, S, 3), np.uint8)
    loss_mask[..., 0] = text_head
    rows = {"token": np.arange(1, S + 1)[None], "target": target, "loss_mask": loss_mask, "doc": doc,
            "modality": np.zeros((1, S), np.int8),
            "pos": np.repeat(np.arange(S, dtype=np.float32)[None, :, None], 3, 2),
            "group": np.arange(S)[None], "audio": np.full((1, S, L), -1), "scale": np.full((1, S), -1),
            "und_index": np.full((1, S), -1), "und_feats": np.zeros((0, 4, 3), np.float32),
            "vis_in": np.zeros((1, S, d), np.float32), "target_audio": np.full((1, S, L), -1)}
    b = make_unified_batch(rows, scales=[1], audio_end=8, specials={"<eoa>": 1000, "<boa>": 1001}, mtp_depth=2,
                           cfg=ObjectiveConfig())
    np.testing.assert_array_equal(b["labels_0"], [[11, 12, I, 14, 15, I, 21, 22, 23, I]])
    # t=1 -> labels_0[2] has no loss; t=4 -> labels_0[5] none; t=5 -> position 6 is doc 1; t=9 -> past the row
    np.testing.assert_array_equal(b["labels_1"], [[12, I, 14, 15, I, I, 22, 23, I, I]])
    # t=4 -> position 6 (target 21) is in doc 1 -> IGNORE although it has a loss; t=8, 9 -> past the row
    np.testing.assert_array_equal(b["labels_2"], [[I, 14, 15, I, I, I, 23, I, I, I]])
