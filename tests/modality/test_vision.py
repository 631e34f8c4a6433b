"""Vision tokenizer: bit quantiser round trip, multi-scale decode, temporal causality, training improves."""

import numpy as np
import paddle
import pytest

from ernie5.modality.bitwise import MultiScaleBitQuantizer, bits_to_ids, ids_to_bits
from ernie5.modality.vision import RandomConvTeacher, VisionTokenizer, VisionTokenizerConfig, inflate_state


def _model(**kw):
    paddle.seed(0)
    cfg = VisionTokenizerConfig(channels=16, **kw)
    cfg.validate("vision")
    return VisionTokenizer(cfg)


def test_bit_quantiser_round_trip():
    q = MultiScaleBitQuantizer(bits=6, scales=[1, 2, 4])
    f = paddle.randn([3, 6, 4, 4])
    f_st, codes, losses = q(f)
    assert [tuple(c.shape) for c in codes] == [(3, 1, 1, 6), (3, 2, 2, 6), (3, 4, 4, 6)]
    # decoding the codes reproduces the quantised latent exactly (the straight-through value)
    assert np.allclose(q.dequantize(codes, 4).numpy(), f_st.numpy(), atol=1e-5)
    # a latent that is already on the 1-scale grid with the right magnitude is reproduced exactly (eval mode:
    # the magnitude is not re-estimated from this input)
    q1 = MultiScaleBitQuantizer(bits=4, scales=[2])
    q1.eval()
    signs = paddle.to_tensor(np.random.default_rng(0).choice([-1.0, 1.0], (2, 4, 2, 2)).astype("float32"))
    _, c1, _ = q1(signs * q1.alpha(0))
    assert np.allclose(q1.dequantize(c1, 2).numpy(), (signs * q1.alpha(0)).numpy(), atol=1e-6)
    ids = bits_to_ids(codes[-1])
    assert int(ids.max()) < 2 ** 6 and (ids_to_bits(ids, 6).numpy() == codes[-1].numpy()).all()
    assert set(losses) == {"commit", "quant_error", "entropy"}


def test_next_scale_inputs_are_linear_in_the_sign_bits_and_magnitudes_are_statistics():
    rng = np.random.default_rng(0)
    f = paddle.to_tensor(rng.normal(size=(16, 4, 8, 8)).astype("float32"))
    q = MultiScaleBitQuantizer(bits=4, scales=[1, 2, 4, 8], magnitude_fraction=0.5)
    f_st, codes, _ = q(f)  # training mode, first batch: alpha_k = 0.5 * mean |residual k| of this batch
    r = f.numpy()
    for k, s in enumerate(q.scales):
        r_small = r.reshape(16, 4, s, 8 // s, s, 8 // s).mean(axis=(3, 5))
        assert q.alpha(k).item() == pytest.approx(0.5 * np.abs(r_small).mean(), rel=1e-4)
        assert ((r_small > 0) == codes[k].numpy().transpose(0, 3, 1, 2)).all()  # bit = sign of the residual
        r = f.numpy() - q.dequantize(codes, 8, k + 1).numpy()
    assert np.allclose(q.dequantize(codes, 8).numpy(), f_st.numpy(), atol=1e-5)
    q.eval()  # magnitudes are constants now
    codes = q(f)[1]
    inputs = q.next_scale_inputs(codes, 8)
    # documented formula: x_k = sum_{j<k} alpha_j * D_k(U_j(S_j)), checked with dense resample matrices
    for k, x in enumerate(inputs, start=1):
        want = np.zeros(x.shape, np.float32)
        for j in range(k):
            signs = codes[j].numpy().astype(np.float32) * 2 - 1  # [N, s_j, s_j, d]
            M = _resample_matrix(q.scales[j], q.scales[k], 8)  # [s_k^2, s_j^2]
            flat = signs.reshape(len(signs), -1, 4)
            want += q.alpha(j).item() * np.einsum("pq,nqd->npd", M, flat).reshape(x.shape)
        assert np.allclose(x.numpy(), want, atol=1e-5)


def test_batch_entropy_weight_above_one_recentres_a_lopsided_coarse_scale():
    # per-image latent means ~0.5 +- 0.1: every 1x1 bit is 1 (a constant coarse token, the old failure)
    rng = np.random.default_rng(0)
    init = (rng.normal(0.5, 0.1, (64, 4, 1, 1)) + rng.normal(0, 0.3, (64, 4, 8, 8))).astype("float32")

    def coarse_bit_mean(gamma):
        f = paddle.create_parameter([64, 4, 8, 8], "float32", default_initializer=paddle.nn.initializer.Assign(init))
        q = MultiScaleBitQuantizer(4, [1, 2, 4, 8], entropy_temperature=0.5, batch_entropy_weight=gamma)
        opt = paddle.optimizer.Adam(0.02, parameters=[f])
        for _ in range(60):  # the entropy term alone moves the latent
            q(f)[2]["entropy"].backward()
            opt.step()
            opt.clear_grad()
        return float(q(f)[1][0].numpy().mean())

    assert coarse_bit_mean(0.0) == 1.0
    # at gamma 1 the confidence and balance gradients nearly cancel; at 2 the coarse bits are re-centred
    assert abs(coarse_bit_mean(2.0) - 0.5) < min(0.15, abs(coarse_bit_mean(1.0) - 0.5))


def test_batch_entropy_counts_whole_tokens_not_single_bits():
    from ernie5.modality.bitwise import _batch_token_entropy

    rng = np.random.default_rng(0)
    coin = rng.random((256, 1, 1, 1)) < 0.5
    together = np.repeat(coin, 4, axis=1)  # every bit balanced, but the 4 bits of a cell always agree
    independent = rng.random((256, 4, 1, 1)) < 0.5
    h = [float(_batch_token_entropy(paddle.to_tensor(np.where(b, 0.999, 0.001).astype("float32"))))
         for b in (together, independent)]
    assert h[0] == pytest.approx(np.log(2) / 4, rel=0.05) and h[1] == pytest.approx(np.log(2), rel=0.05)


def _resample_matrix(s_from: int, s_to: int, side: int) -> np.ndarray:
    """The linear map grid s_from -> (bilinear up to side) -> (area down to s_to), probed with unit impulses."""
    from ernie5.modality.bitwise import resize

    eye = paddle.eye(s_from * s_from).reshape([-1, 1, s_from, s_from])
    out = resize(resize(eye, side), s_to).reshape([s_from * s_from, s_to * s_to]).numpy()
    return out.T


def test_multiscale_decode_of_codes_equals_decode_of_quantised_latent():
    m = _model()
    m.eval()
    x = paddle.rand([2, 1, 1, 16, 16]) * 2 - 1
    codes = m.encode(x)
    assert [tuple(c.shape) for c in codes] == [(2, 1, s, s, 4) for s in (1, 2, 4, 8)]
    f_st, _, _, _ = m._quantize(x)
    assert np.allclose(m.decode(codes).numpy(), m.decoder(f_st).numpy(), atol=1e-5)
    inputs = m.next_scale_inputs(codes)
    assert [tuple(t.shape) for t in inputs] == [(2, 1, s, s, 4) for s in (2, 4, 8)]
    # the input for scale k is the sum of scales < k: for k=1 it is the 1x1 scale resized (a constant)
    assert np.allclose(inputs[0].numpy(), m.quant.dequantize([codes[0][:, 0]], 2, 1).numpy().transpose(0, 2, 3, 1)[:, None])
    assert tuple(m.features(x).shape) == (2, 1, 8, 8, 16)


def test_encoder_is_causal_in_time_and_image_is_one_frame_video():
    m = _model()
    m.eval()
    v = paddle.rand([2, 1, 4, 16, 16]) * 2 - 1
    base = m.encode(v)
    for k in (1, 3):
        v2 = v.clone()
        v2[:, :, k] = paddle.rand([2, 1, 16, 16])
        other = m.encode(v2)
        for a, b in zip(base, other):
            assert (a[:, :k].numpy() == b[:, :k].numpy()).all()  # frames < k unchanged
        assert any((a[:, k].numpy() != b[:, k].numpy()).any() for a, b in zip(base, other))
    # frame 0 of a video is encoded exactly like the same picture as an image (fast 2D path)
    img_codes = m.encode(v[:, :, :1])
    for a, b in zip(base, img_codes):
        assert (a[:, :1].numpy() == b.numpy()).all()


def test_training_improves_heldout_reconstruction_and_teacher_hook():
    from ernie5.data.digits_world import digit_images

    imgs, _ = digit_images(16)
    x = imgs.astype(np.float32) / 127.5 - 1
    train, val = paddle.to_tensor(x[:1500, None, None]), paddle.to_tensor(x[1700:, None, None])
    paddle.seed(0)
    cfg = VisionTokenizerConfig(channels=16, teacher_weight=0.1)
    m = VisionTokenizer(cfg, teacher=RandomConvTeacher(1))

    def heldout_mse():
        m.eval()
        out = float(((m.decode(m.encode(val)) - val) ** 2).mean())
        m.train()
        return out

    before = heldout_mse()
    opt = paddle.optimizer.Adam(3e-3, parameters=m.parameters())
    rng = np.random.default_rng(0)
    for _ in range(60):
        _, losses = m(train[rng.choice(1500, 32)])
        losses["total"].backward()
        opt.step()
        opt.clear_grad()
    assert "teacher" in losses and float(losses["teacher"]) < 1.0
    after = heldout_mse()
    assert after < 0.5 * before, (before, after)
    # progressive bit widths: an 8-bit model initialised from this one decodes its (zero-extended) codes alike
    wide = VisionTokenizer(VisionTokenizerConfig(channels=16, bits=8))
    inflate_state(m.state_dict(), wide)
    wide.eval()
    m.eval()
    assert float(((wide.decode(wide.encode(val)) - val) ** 2).mean()) == pytest.approx(after, rel=0.05)
