"""Resolution buckets: nearest aspect ratio, aspect-preserving cover resize, crops inside the picture,
reproducible random crops, records that redo the crop."""

import numpy as np
import pytest

from ernie5.data.buckets import Bucket, BucketConfig, assign_bucket, cover_size, default_buckets, fit_to_bucket
from ernie5.errors import ConfigError


def test_default_buckets_divisible_and_both_orientations():
    buckets = default_buckets()
    assert Bucket(32, 32) in buckets and Bucket(32, 48) in buckets and Bucket(48, 32) in buckets
    assert all(b.height % 16 == 0 and b.width % 16 == 0 for b in buckets)
    assert {round(b.aspect, 3) for b in buckets} >= {1.0, 1.5, round(1 / 1.5, 3), 2.0, 0.5}
    with pytest.raises(ConfigError, match="divisible"):
        BucketConfig(sizes=[[32, 40]], multiple=16).buckets()
    assert BucketConfig(sizes=[[32, 40]], multiple=8).buckets() == [Bucket(32, 40)]


def test_landscape_and_portrait_pictures_get_matching_buckets():
    wide, tall = assign_bucket(1080, 1920), assign_bucket(1920, 1080)  # 16:9 and 9:16
    assert wide.width > wide.height and tall.height > tall.width
    assert (tall.height, tall.width) == (wide.width, wide.height)
    assert assign_bucket(500, 500) == Bucket(32, 32)
    assert assign_bucket(300, 450) == Bucket(32, 48)  # exactly 3:2
    assert assign_bucket(480, 640) == Bucket(48, 64)  # 4:3
    # nearest in log ratio: 16:9 (log 0.575) is nearer 2:1 (0.693) than 3:2 (0.405)
    assert wide == Bucket(32, 64)
    # equal ratio distance: the bucket nearer in area wins, then list order
    same_ratio = [Bucket(64, 64), Bucket(32, 32)]
    assert assign_bucket(40, 40, same_ratio) == Bucket(32, 32) and assign_bucket(70, 70, same_ratio) == Bucket(64, 64)


@pytest.mark.parametrize("mode", ["center", "random"])
def test_resize_keeps_aspect_and_crop_lies_inside(mode):
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(20, 900, size=2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        bucket = assign_bucket(h, w)
        out, rec = fit_to_bucket(img, bucket, mode, rng)
        assert out.shape == (bucket.height, bucket.width, 3) and out.dtype == np.uint8
        rh, rw = rec["resized_size"]
        assert rh >= bucket.height and rw >= bucket.width and (rh == bucket.height or rw == bucket.width)
        assert abs(rw - w * rh / h) <= 1 and abs(rh - h * rw / w) <= 1  # aspect kept within one pixel
        top, left, bottom, right = rec["crop_box"]
        assert 0 <= top < bottom <= rh and 0 <= left < right <= rw
        assert (bottom - top, right - left) == (bucket.height, bucket.width)
        st, sl, sb, sr = rec["source_box"]
        assert 0 <= st < sb <= h + 1e-6 and 0 <= sl < sr <= w + 1e-6
        assert rec["bucket"] == bucket.name and rec["source_size"] == [h, w] and rec["mode"] == mode
        assert cover_size(h, w, bucket) == (rh, rw)


def test_center_crop_takes_the_middle_and_record_redoes_the_crop():
    from PIL import Image

    h, w = 90, 300  # wide: the bucket height is matched, the sides are cut
    cols = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))
    img = np.stack([cols, 255 - cols, np.full_like(cols, 7)], -1)
    out, rec = fit_to_bucket(img, Bucket(32, 64), "center")
    rh, rw = rec["resized_size"]
    assert rh == 32 and rec["crop_box"][1] == (rw - 64) // 2
    assert abs(int(out[:, 32, 0].mean()) - 128) < 6 and (out[..., 2] == 7).all()  # middle of the ramp, RGB kept
    resized = np.asarray(Image.fromarray(img).resize((rw, rh), Image.BICUBIC))
    t, l, b, r = rec["crop_box"]
    assert (resized[t:b, l:r] == out).all()


def test_random_crops_reproducible_from_the_seed():
    img = np.random.default_rng(1).integers(0, 256, (200, 800, 3), dtype=np.uint8)
    b = Bucket(32, 48)
    a1, r1 = fit_to_bucket(img, b, "random", 123)
    a2, r2 = fit_to_bucket(img, b, "random", np.random.default_rng(123))
    assert r1 == r2 and (a1 == a2).all()
    boxes = {tuple(fit_to_bucket(img, b, "random", s)[1]["crop_box"]) for s in range(10)}
    assert len(boxes) > 5


def test_gray_and_float_pictures_and_bad_input():
    gray = np.random.default_rng(0).integers(0, 256, (60, 100), dtype=np.uint8)
    out, rec = fit_to_bucket(gray, Bucket(32, 48))
    assert out.shape == (32, 48) and rec["bucket"] == "32x48"
    f = np.random.default_rng(0).random((60, 100, 3)).astype(np.float32)
    out, _ = fit_to_bucket(f, Bucket(32, 48))
    assert out.shape == (32, 48, 3) and out.dtype == np.float32 and -0.2 < out.min() and out.max() < 1.2
    with pytest.raises(ValueError, match="mode"):
        fit_to_bucket(gray, Bucket(32, 32), "stretch")
    with pytest.raises(ValueError, match="positive"):
        assign_bucket(0, 10)
