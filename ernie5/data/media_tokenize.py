"""Media -> `Segment`s: `SegmentTokenizer` decodes a document's raw segments (files or tar-member bytes, through
`ernie5.data.media_decode`: every failure a one-line `UserError` naming the file) and runs the text, vision and
audio tokenizers on them (tokenizers run offline, apart from the backbone). `visual_history_maps` measures the linear map from earlier
scales' sign bits to the visual inputs (training corrupts the visual history through it)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from ernie5.data.media_decode import decode_audio, decode_image, decode_video
from ernie5.data.sequence import Segment
from ernie5.errors import UserError


class SegmentTokenizer:
    """Turns manifest segments into `Segment`s with the three tokenizers."""

    def __init__(self, text_tokenizer: str, vision_tokenizer: str, audio_tokenizer: str, root: Path,
                 buckets: list | None = None, crop: str = "center"):
        from ernie5.modality.media_io import load_asset
        from ernie5.modality.text_tokenizer import TextTokenizer

        self.root = root
        self.text = TextTokenizer(text_tokenizer)
        self.vision = load_asset(vision_tokenizer)
        self.audio = load_asset(audio_tokenizer)
        self.bits, self.levels = self.vision.cfg.bits, self.audio.cfg.levels
        self.buckets = self._check_buckets(buckets)
        self.crop = crop
        self._bucket_table = self.bucket_table()

    def __call__(self, raw: dict) -> Segment:
        """A raw segment: `{"kind", "role", "text"}`, `{"kind", "role", "path"}` (relative to the root) or
        `{"kind", "role", "bytes", "name"}` (e.g. a tar member; `name` is what errors call it)."""
        import paddle

        kind, role = raw.get("kind"), raw.get("role", "target")
        if kind == "text":
            return Segment("text", role, ids=self.text.encode(raw["text"]))
        if kind == "sep":
            return Segment("sep", role)
        if kind not in ("image", "video", "audio"):
            raise UserError(f"segment kind {kind!r}", "expected text, image, video, audio or sep")
        if "bytes" in raw:
            src, name = raw["bytes"], str(raw.get("name", f"<{kind} bytes>"))
        else:
            src = self.root / raw["path"]
            name = str(src)
        if kind == "audio":
            wav = decode_audio(src, name, self.audio.cfg.sample_rate)
            hop = self.audio.cfg.hop
            padded = np.zeros(-(-len(wav) // hop) * hop, np.float32)
            padded[:len(wav)] = wav
            with paddle.no_grad():
                codes = self.audio.encode(paddle.to_tensor(padded[None]))
            return Segment("audio", role, audio_codes=codes.numpy()[0])
        c = self.vision.cfg
        px = decode_image(src, name, c.in_channels)[None] if kind == "image" else decode_video(src, name, c.in_channels)
        px, meta = self.fit(px, str(raw.get("path") or Path(name).name))  # seed: independent of where data lives
        if role == "input":
            return Segment(kind, role, und=self.understanding_features(px), meta=meta)
        x = paddle.to_tensor(px.transpose(3, 0, 1, 2)[None])  # [1, C, T, H, W]
        with paddle.no_grad():
            codes = self.vision.encode(x)
            inputs = self.vision.next_scale_inputs(codes)
            latent = self.vision.quantized_latent(codes)  # [1, d, T, L, L]: every scale of every frame
        return Segment(kind, role, codes=[c.numpy()[0] for c in codes], scale_inputs=[x.numpy()[0] for x in inputs],
                       frame_latent=latent.numpy()[0].transpose(1, 2, 3, 0), meta=meta)

    def _check_buckets(self, sizes):
        """Resolution buckets ([H, W] pixel sizes) as `Bucket`s; None: only the tokenizer's square. Each side must
        give an even latent grid (the frame context group merges 2x2 latent cells)."""
        from ernie5.data.buckets import Bucket

        if not sizes:
            return None
        step = 2 << self.vision.cfg.downsample
        for h, w in sizes:
            if h % step or w % step:
                raise UserError(f"buckets: {h}x{w}", f"sides must be multiples of {step} (2 x the vision tokenizer's "
                                                     f"downsampling {step // 2}): the latent grid must be even")
        return [Bucket(int(h), int(w)) for h, w in sizes]

    def latent_grids(self) -> list[tuple[int, int]]:
        """The latent (h, w) grids this tokenizer can produce: each bucket's, or the square."""
        ds = self.vision.cfg.downsample
        if self.buckets is None:
            return [(self.vision.cfg.latent_side,) * 2]
        return sorted({(b.height >> ds, b.width >> ds) for b in self.buckets})

    def bucket_table(self) -> dict:
        """meta.json's record of the buckets: pixel size, latent grid and scale schedule (token grids) of each."""
        from ernie5.modality.bitwise import scale_schedule

        ds, scales = self.vision.cfg.downsample, self.vision.cfg.scales
        sizes = ([(b.height, b.width) for b in self.buckets] if self.buckets is not None
                 else [(self.vision.cfg.image_size,) * 2])
        return {f"{h}x{w}": {"pixels": [h, w], "latent": [h >> ds, w >> ds],
                             "schedule": [list(g) for g in scale_schedule(scales, h >> ds, w >> ds)]}
                for h, w in sizes}

    def fit(self, px_THWC: np.ndarray, name: str = "") -> tuple[np.ndarray, dict]:
        """Frames of any size -> (frames fitted to a resolution bucket, the sample's record). The bucket is the
        nearest in aspect ratio (`ernie5.data.buckets`) or, with no buckets, the tokenizer's image_size square; the
        frames are resized keeping the aspect ratio to cover it, then cropped (every frame alike) in the middle or,
        with crop "random", at an offset seeded by `name` (the file or tar member: the same crop on every run and
        in every worker). The record (`fit_to_bucket`'s: bucket, source size, crop box) adds the bucket's latent
        grid and scale schedule; prepared shards keep it per document (`{split}.samples.jsonl`)."""
        from ernie5.data.buckets import Bucket, assign_bucket, fit_to_bucket

        H, W = px_THWC.shape[1:3]
        side = self.vision.cfg.image_size
        target = Bucket(side, side) if self.buckets is None else assign_bucket(H, W, self.buckets)
        seed = zlib.crc32(name.encode("utf-8"))
        same = (H, W) == (target.height, target.width)  # already the bucket's size: nothing to resize or crop
        fitted = [fit_to_bucket(f, target, self.crop, seed) for f in (px_THWC[:1] if same else px_THWC)]
        grid = self._bucket_table[target.name]
        record = {**fitted[0][1], "frames": len(px_THWC), "latent": grid["latent"], "schedule": grid["schedule"]}
        if same:
            return px_THWC, record
        return np.clip(np.stack([f for f, _ in fitted]), -1.0, 1.0), record

    def understanding_features(self, px: np.ndarray) -> np.ndarray:
        """[T, h, w, Ch + P]: the tokenizer encoder's continuous features (the "CNN" path, Ch channels) and the raw
        pixels of each latent cell (P = r * r * C with r = H / h: the input of the model's ViT-style patch path).
        `px`: frames [T, H, W, C] in [-1, 1] ([T, H, W]: one channel)."""
        import paddle

        px = np.asarray(px, np.float32)
        if px.ndim == 3:
            px = px[..., None]
        T, H, W, C = px.shape
        with paddle.no_grad():
            cnn = self.vision.features(paddle.to_tensor(px.transpose(3, 0, 1, 2)[None])).numpy()[0]  # [T, h, w, Ch]
        h, w = cnn.shape[1:3]
        r = H // h
        pix = px.reshape(T, h, r, w, r, C).transpose(0, 1, 3, 2, 4, 5).reshape(T, h, w, r * r * C)
        return np.concatenate([cnn, pix], -1).astype(np.float32)

    @property
    def und_dims(self) -> tuple[int, int]:
        """(CNN feature channels, pixel values per latent cell: r * r * C)."""
        c = self.vision.cfg
        return c.channels, (c.image_size // c.latent_side) ** 2 * c.in_channels


def visual_history_maps(vision, grid: tuple[int, int] | None = None) -> dict:
    """The visual inputs as a linear map of the scales' signs, measured by probing the tokenizer, for one latent
    grid (h, w) (a resolution bucket; default the tokenizer's square) and its scale schedule
    (`bitwise.scale_schedule`). With K scales, "input k" is scale k's input for k = 1..K-1 (`next_scale_inputs`,
    on scale k's grid) and, for k = K, the frame context group's latent (`quantized_latent`: all K scales on the
    h x w latent grid, before `space_to_depth`): input_k [cells_k, d] = base_k + sum_{j<k} A_jk @ (signs_j + 1),
    signs = 2 bits - 1, where base_k is the input with every bit 0 and A_jk [cells_k, cells_j] half the response to
    setting one bit of scale j (every channel uses the same spatial map). So flipping bits changes the inputs by
    sum_j A_jk @ (signs'_j - signs_j). Returns {"HxW/A_j_k": ..., "HxW/base_k": ...} (H x W the latent grid) for
    0 <= j < k <= len(scales)."""
    import paddle

    from ernie5.modality.bitwise import scale_schedule

    scales, d = vision.cfg.scales, vision.cfg.bits
    h, w = grid if grid is not None else (vision.cfg.latent_side,) * 2
    grids = scale_schedule(scales, h, w)
    K = len(scales)

    def inputs(codes):
        with paddle.no_grad():
            t = [paddle.to_tensor(c[None, None]) for c in codes]
            scale_in = [x.numpy()[0, 0].reshape(-1, d) for x in vision.next_scale_inputs(t)]
            full = vision.quantized_latent(t).numpy()[0, :, 0].transpose(1, 2, 0).reshape(-1, d)
        return scale_in + [full]  # index k - 1 for k = 1..K

    zeros = [np.zeros((gh, gw, d), np.uint8) for gh, gw in grids]
    base = inputs(zeros)
    key = f"{h}x{w}/"
    out = {f"{key}base_{k}": base[k - 1] for k in range(1, K + 1)}
    for j, (gh, gw) in enumerate(grids):
        cols = {k: np.zeros((len(base[k - 1]), gh * gw), np.float32) for k in range(j + 1, K + 1)}
        for p in range(gh * gw):
            codes = [z.copy() for z in zeros]
            codes[j].reshape(-1, d)[p, 0] = 1  # flip bit 0 of cell p: all channels share the spatial map
            probe = inputs(codes)
            for k in cols:
                cols[k][:, p] = (probe[k - 1][:, 0] - base[k - 1][:, 0]) / 2.0
        for k, a in cols.items():
            out[f"{key}A_{j}_{k}"] = a
    return out
