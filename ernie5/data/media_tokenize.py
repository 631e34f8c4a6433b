"""Media -> `Segment`s: `SegmentTokenizer` decodes a document's raw segments (files or tar-member bytes, through
`ernie5.data.media_decode`: every failure a one-line `UserError` naming the file) and runs the text, vision and
audio tokenizers on them (tokenizers run offline, apart from the backbone). `visual_history_maps` measures the linear map from earlier
scales' sign bits to the visual inputs (training corrupts the visual history through it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ernie5.data.media_decode import decode_audio, decode_image, decode_video
from ernie5.data.sequence import Segment
from ernie5.errors import UserError


class SegmentTokenizer:
    """Turns manifest segments into `Segment`s with the three tokenizers."""

    def __init__(self, text_tokenizer: str, vision_tokenizer: str, audio_tokenizer: str, root: Path):
        from ernie5.modality.media_io import load_asset
        from ernie5.modality.text_tokenizer import TextTokenizer

        self.root = root
        self.text = TextTokenizer(text_tokenizer)
        self.vision = load_asset(vision_tokenizer)
        self.audio = load_asset(audio_tokenizer)
        self.bits, self.levels = self.vision.cfg.bits, self.audio.cfg.levels

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
        px = self.fit(px)
        if role == "input":
            return Segment(kind, role, und=self.understanding_features(px))
        x = paddle.to_tensor(px.transpose(3, 0, 1, 2)[None])  # [1, C, T, H, W]
        with paddle.no_grad():
            codes = self.vision.encode(x)
            inputs = self.vision.next_scale_inputs(codes)
            latent = self.vision.quantized_latent(codes)  # [1, d, T, L, L]: every scale of every frame
        return Segment(kind, role, codes=[c.numpy()[0] for c in codes], scale_inputs=[x.numpy()[0] for x in inputs],
                       frame_latent=latent.numpy()[0].transpose(1, 2, 3, 0))

    def fit(self, px_THWC: np.ndarray) -> np.ndarray:
        """Frames of any size -> the tokenizer's image_size square: resized keeping the aspect ratio to cover it,
        then the centre cropped (`ernie5.data.buckets.fit_to_bucket`; every frame alike)."""
        from ernie5.data.buckets import Bucket, fit_to_bucket

        side = self.vision.cfg.image_size
        if px_THWC.shape[1:3] == (side, side):
            return px_THWC
        square = Bucket(side, side)
        return np.clip(np.stack([fit_to_bucket(f, square, "center")[0] for f in px_THWC]), -1.0, 1.0)

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


def visual_history_maps(vision) -> dict:
    """The visual inputs as a linear map of the scales' signs, measured by probing the tokenizer. With K scales,
    "input k" is scale k's input for k = 1..K-1 (`next_scale_inputs`, on scale k's grid) and, for k = K, the frame
    context group's latent (`quantized_latent`: all K scales on the L x L latent grid, before `space_to_depth`):
    input_k [cells_k, d] = base_k + sum_{j<k} A_jk @ (signs_j + 1), signs = 2 bits - 1, where base_k is the input
    with every bit 0 and A_jk [cells_k, s_j^2] half the response to setting one bit of scale j (every channel uses
    the same spatial map). So flipping bits changes the inputs by sum_j A_jk @ (signs'_j - signs_j).
    Returns {"A_j_k": ..., "base_k": ...} for 0 <= j < k <= len(scales)."""
    import paddle

    scales, d = vision.cfg.scales, vision.cfg.bits
    K = len(scales)

    def inputs(codes):
        with paddle.no_grad():
            t = [paddle.to_tensor(c[None, None]) for c in codes]
            scale_in = [x.numpy()[0, 0].reshape(-1, d) for x in vision.next_scale_inputs(t)]
            full = vision.quantized_latent(t).numpy()[0, :, 0].transpose(1, 2, 0).reshape(-1, d)
        return scale_in + [full]  # index k - 1 for k = 1..K

    zeros = [np.zeros((s, s, d), np.uint8) for s in scales]
    base = inputs(zeros)
    out = {f"base_{k}": base[k - 1] for k in range(1, K + 1)}
    for j, s in enumerate(scales):
        cols = {k: np.zeros((len(base[k - 1]), s * s), np.float32) for k in range(j + 1, K + 1)}
        for p in range(s * s):
            codes = [z.copy() for z in zeros]
            codes[j].reshape(-1, d)[p, 0] = 1  # flip bit 0 of cell p: all channels share the spatial map
            probe = inputs(codes)
            for k in cols:
                cols[k][:, p] = (probe[k - 1][:, 0] - base[k - 1][:, 0]) / 2.0
        for k, a in cols.items():
            out[f"A_{j}_{k}"] = a
    return out
