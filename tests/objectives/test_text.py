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
