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


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    """A tiny RGB tokenizer trained for seconds on 16px photo crops (held out by source picture)."""
    pytest.importorskip("skimage")
    from ernie5.data.photos import fetch_photos
    from ernie5.modality.media_io import MediaTrainConfig, TokenizerRecipe
    from ernie5.tools.vision_train import train_vision

    root = tmp_path_factory.mktemp("rgb")
    fetch_photos(str(root / "photos"), sizes=(16,), num_train=400, num_heldout=48, videos=False)
    recipe = TokenizerRecipe(
        output=str(root / "rgb.safetensors"), data_dir=str(root / "photos"),
        vision=VisionTokenizerConfig(in_channels=3, image_size=16, channels=16, downsample=1, bits=6,
                                     scales=[1, 2, 4, 8], entropy_weight=0.1),
        train=MediaTrainConfig(steps=80, batch_size=16, lr=3e-3, video_every=0, log_every=1000))
    paddle.seed(0)
    lines = []
    report = train_vision(recipe, log=lines.append)
    return root, recipe, report, lines


def test_rgb_tokenizer_beats_the_mean_image_on_unseen_photos(rgb_run):
    _, _, report, lines = rgb_run
    table = report["heldout_metrics"]
    full, mean = table["per_scale_count"][-1], table["baselines"]["mean_train_image"]
    assert report["data"] == "photos" and report["heldout_images"] == 48
    assert full["psnr_db"] > mean["psnr_db"] + 3 and full["ssim"] > mean["ssim"] + 0.1, table
    assert [r["scales"] for r in table["per_scale_count"]] == [1, 2, 3, 4]
    assert [r["bits_per_image"] for r in table["per_scale_count"]] == [6, 30, 126, 510]
    assert table["per_scale_count"][-1]["psnr_db"] > table["per_scale_count"][0]["psnr_db"]  # scales refine
    assert "downsample_4x_bilinear_up" in table["baselines"]
    assert any("PSNR dB" in line for line in lines) and any("baseline mean_train_image" in line for line in lines)


def test_reported_psnr_ssim_equal_scikit_image_on_the_same_arrays(rgb_run):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from ernie5.data.photos import load_photos
    from ernie5.modality.media_io import load_asset

    root, recipe, report, _ = rgb_run
    model = load_asset(recipe.output)
    p = load_photos(recipe.data_dir, 16)
    ref = p["heldout"].astype(np.float64) / 255.0  # [N, H, W, 3]
    x = paddle.to_tensor((p["heldout"].astype(np.float32) / 127.5 - 1).transpose(0, 3, 1, 2)[:, :, None])
    codes = model.encode(x)
    flat = [c[:, 0] for c in codes]
    for k, row in enumerate(report["heldout_metrics"]["per_scale_count"], start=1):
        f = model.quant.dequantize(flat, model.cfg.latent_side, upto=k)
        rec = model.decoder(f.unsqueeze(2)).numpy()[:, :, 0].transpose(0, 2, 3, 1)
        rec = np.clip((rec + 1) / 2, 0, 1).astype(np.float64)
        assert row["psnr_db"] == pytest.approx(peak_signal_noise_ratio(ref, rec, data_range=1.0), abs=0.011)
        ssim = np.mean([structural_similarity(a, b, data_range=1.0, channel_axis=-1) for a, b in zip(ref, rec)])
        assert row["ssim"] == pytest.approx(ssim, abs=2e-4)
    mean = p["train"].astype(np.float64).mean(0) / 255.0
    want = peak_signal_noise_ratio(ref, np.broadcast_to(mean, ref.shape), data_range=1.0)
    assert report["heldout_metrics"]["baselines"]["mean_train_image"]["psnr_db"] == pytest.approx(want, abs=0.011)


def test_rgb_channel_order_survives_the_tokenizer(rgb_run):
    from PIL import Image

    from ernie5.modality.media_io import load_asset

    root, recipe, report, _ = rgb_run
    model = load_asset(recipe.output)
    rng = np.random.default_rng(0)
    # a red and a blue crop (noisy); a saturated green is left out: the seconds-long run has seen too little of it
    base = np.array([[200, 40, 40], [40, 60, 200]], np.float32)
    imgs = np.clip(base[:, None, None] + rng.normal(0, 12, (2, 16, 16, 3)), 0, 255) / 127.5 - 1
    x = paddle.to_tensor(imgs.astype(np.float32).transpose(0, 3, 1, 2)[:, :, None])
    rec = model.decode(model.encode(x)).numpy()[:, :, 0].mean(axis=(2, 3))  # [2 crops, 3 channels]
    assert rec[0, 0] > rec[0, 1] + 0.3 and rec[0, 0] > rec[0, 2] + 0.3, rec  # the red crop reconstructs reddish
    assert rec[1].argmax() == 2 and rec[1, 2] > rec[1, 0] + 0.2, rec  # the blue one bluish
    png = np.asarray(Image.open(report["png"]).convert("RGB")).astype(int)
    assert (np.abs(png[..., 0] - png[..., 2]) > 60).mean() > 0.01  # the comparison figure is in colour


def test_data_dependent_init_and_channel_mismatch(rgb_run):
    from ernie5.errors import UserError
    from ernie5.tools.vision_train import data_dependent_init, train_vision

    paddle.seed(0)
    m = VisionTokenizer(VisionTokenizerConfig(in_channels=3, image_size=16, channels=16))
    x = paddle.rand([8, 3, 1, 16, 16]) * 2 - 1
    st = data_dependent_init(m, x)
    assert st["after"]["latent_std"] == pytest.approx(1.0, rel=1e-3)
    assert st["after"]["output_std"] == pytest.approx(0.5 * float(x.std()), rel=1e-3)
    _, recipe, _, _ = rgb_run
    recipe.vision.in_channels = 1
    try:
        with pytest.raises(UserError, match="in_channels.*3-channel"):
            train_vision(recipe)
    finally:
        recipe.vision.in_channels = 3
