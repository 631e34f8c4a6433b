"""Resolution buckets: a few pixel sizes (H, W) at several aspect ratios, so a picture keeps roughly its shape
instead of being squashed or cut to a square.

A picture goes to the bucket whose aspect ratio is nearest in log ratio (|log(W/H) - log(bw/bh)|; ties: the
bucket whose area is nearest the picture's in log area, then the earlier one). `fit_to_bucket` resizes it keeping
its aspect ratio so that it *covers* the bucket (scale = max(bh / H, bw / W); each side rounded, so the aspect
ratio moves by less than one pixel), then crops the bucket out of the resized picture, centred or at a seeded
random offset. The returned record names the bucket and the crop box (in the resized picture and mapped back to
source pixels), so it can be stored with each sample and the crop redone exactly.

Every bucket side is a multiple of `BucketConfig.multiple` (the vision tokenizer's spatial downsampling factor
2^downsample, or a multiple of it), so the latent and token grid of a bucket are whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ernie5.config.schema import join, require


@dataclass(frozen=True)
class Bucket:
    """One target size in pixels."""

    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def aspect(self) -> float:
        """width / height (> 1: landscape)."""
        return self.width / self.height


@dataclass
class BucketConfig:
    """The bucket set: (H, W) pixel sizes, every side a multiple of `multiple`. The default keeps the short side at
    32 px (48 for 4:3) and covers 1:1, 3:2, 2:1 and 4:3 in both orientations."""

    sizes: list[list[int]] = field(default_factory=lambda: [[32, 32], [32, 48], [48, 32], [32, 64], [64, 32],
                                                            [48, 64], [64, 48]])
    multiple: int = 16
    crop: str = "center"  # "center", or "random": an offset seeded by the sample's name (the same on every run)

    def validate(self, path: str) -> None:
        require(self.multiple >= 1, join(path, "multiple"), "must be >= 1")
        require(self.crop in ("center", "random"), join(path, "crop"), f"{self.crop!r}: expected center or random")
        require(bool(self.sizes), join(path, "sizes"), "needs at least one [H, W] bucket")
        for i, hw in enumerate(self.sizes):
            where = join(path, f"sizes[{i}]")
            require(len(hw) == 2 and all(int(v) > 0 for v in hw), where, f"{hw} is not a positive [H, W]")
            require(all(int(v) % self.multiple == 0 for v in hw), where,
                    f"{hw} is not divisible by multiple={self.multiple} (the tokenizer's downsample factor)")
        require(len({tuple(hw) for hw in self.sizes}) == len(self.sizes), join(path, "sizes"), "has duplicates")

    def buckets(self) -> list[Bucket]:
        self.validate("buckets")
        return [Bucket(int(h), int(w)) for h, w in self.sizes]


def default_buckets() -> list[Bucket]:
    return BucketConfig().buckets()


def assign_bucket(h: int, w: int, buckets: list[Bucket] | None = None) -> Bucket:
    """The bucket nearest in aspect ratio (log ratio) to an h x w picture; ties by log area, then list order."""
    if h <= 0 or w <= 0:
        raise ValueError(f"picture size must be positive, got {h}x{w}")
    buckets = default_buckets() if buckets is None else buckets
    ratio, area = math.log(w / h), math.log(w * h)

    def key(ib):
        i, b = ib
        return (round(abs(ratio - math.log(b.aspect)), 9), abs(area - math.log(b.width * b.height)), i)

    return min(enumerate(buckets), key=key)[1]


def cover_size(h: int, w: int, bucket: Bucket) -> tuple[int, int]:
    """(H', W'): h x w scaled by max(bh / h, bw / w), each side rounded and at least the bucket's."""
    scale = max(bucket.height / h, bucket.width / w)
    return max(bucket.height, round(h * scale)), max(bucket.width, round(w * scale))


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bicubic (antialiased) resize of [H, W] or [H, W, C] to hw; uint8 through Pillow directly, other dtypes
    one float32 channel at a time."""
    from PIL import Image

    H, W = hw
    if img.shape[:2] == (H, W):
        return img.copy()
    if img.dtype == np.uint8 and (img.ndim == 2 or img.shape[2] in (3, 4)):
        return np.asarray(Image.fromarray(img).resize((W, H), Image.BICUBIC))
    chans = img[..., None] if img.ndim == 2 else img
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(chans[..., c], dtype=np.float32)).resize(
        (W, H), Image.BICUBIC)) for c in range(chans.shape[2])], axis=-1)
    out = out[..., 0] if img.ndim == 2 else out
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(img.dtype)


def fit_to_bucket(img_HWC: np.ndarray, bucket: Bucket, mode: str = "center",
                  rng: np.random.Generator | int | None = None) -> tuple[np.ndarray, dict]:
    """Resize (aspect kept, covering the bucket) and crop to the bucket: (image [bh, bw(, C)], record).

    mode "center" crops the middle; "random" draws the offset from `rng` (a Generator or a seed; the same seed
    gives the same crop). The record: bucket name / height / width, source_size (H, W), resized_size (H', W'),
    crop_box (top, left, bottom, right) in the resized picture, source_box the same box in source pixels
    (floats), and mode."""
    if img_HWC.ndim not in (2, 3):
        raise ValueError(f"expected an [H, W] or [H, W, C] image, got shape {img_HWC.shape}")
    h, w = img_HWC.shape[:2]
    rh, rw = cover_size(h, w, bucket)
    if mode == "center":
        top, left = (rh - bucket.height) // 2, (rw - bucket.width) // 2
    elif mode == "random":
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        top, left = int(gen.integers(0, rh - bucket.height + 1)), int(gen.integers(0, rw - bucket.width + 1))
    else:
        raise ValueError(f"mode must be 'center' or 'random', got {mode!r}")
    resized = _resize(img_HWC, (rh, rw))
    out = resized[top:top + bucket.height, left:left + bucket.width]
    sy, sx = h / rh, w / rw
    record = {
        "bucket": bucket.name, "height": bucket.height, "width": bucket.width, "mode": mode,
        "source_size": [h, w], "resized_size": [rh, rw],
        "crop_box": [top, left, top + bucket.height, left + bucket.width],
        "source_box": [round(top * sy, 3), round(left * sx, 3), round((top + bucket.height) * sy, 3),
                       round((left + bucket.width) * sx, 3)],
    }
    return out, record
