"""Media -> `Segment`s: the readers of image / video / audio files (every failure a one-line `UserError` naming
the file) and `SegmentTokenizer`, which runs the text, vision and audio tokenizers on a document's raw segments
(tokenizers run offline, apart from the backbone). `visual_history_maps` measures the linear map from earlier
scales' sign bits to the visual inputs (training corrupts the visual history through it)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from ernie5.data.npy import read_npy
from ernie5.data.sequence import Segment
from ernie5.errors import UserError


def read_image(path: Path) -> np.ndarray:
    """Grayscale pixels in [-1, 1]: [H, W]."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UserError(str(path), "image file missing")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), np.float32) / 127.5 - 1.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(str(path), f"corrupt image ({type(e).__name__})") from None


def read_video(path: Path) -> np.ndarray:
    """uint8 frames .npy [T, H, W] -> [-1, 1]."""
    v = read_npy(path, "video file missing", ndim=3, layout="frames [T, H, W]")
    return v.astype(np.float32) / 127.5 - 1.0


def read_wav(path: Path, sample_rate: int) -> np.ndarray:
    if not path.is_file():
        raise UserError(str(path), "audio file missing")
    try:
        with wave.open(str(path), "rb") as f:
            if f.getsampwidth() != 2 or f.getnchannels() != 1:
                raise UserError(str(path), "expected 16-bit mono WAV")
            if f.getframerate() != sample_rate:
                raise UserError(str(path), f"sample rate {f.getframerate()} != tokenizer's {sample_rate}")
            pcm = np.frombuffer(f.readframes(f.getnframes()), "<i2")
    except (wave.Error, EOFError, OSError) as e:
        raise UserError(str(path), f"corrupt WAV ({e})") from None
    if pcm.size == 0:
        raise UserError(str(path), "empty audio")
    return pcm.astype(np.float32) / 32768.0


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
        import paddle

        kind, role = raw.get("kind"), raw.get("role", "target")
        if kind == "text":
            return Segment("text", role, ids=self.text.encode(raw["text"]))
        if kind == "sep":
            return Segment("sep", role)
        path = self.root / raw["path"]
        if kind in ("image", "video"):
            px = read_image(path)[None] if kind == "image" else read_video(path)
            side = self.vision.cfg.image_size
            if px.shape[1:] != (side, side):
                raise UserError(str(path), f"frames are {px.shape[1:]}, the vision tokenizer takes {side}x{side}")
            if role == "input":
                return Segment(kind, role, und=self.understanding_features(px))
            with paddle.no_grad():
                codes = self.vision.encode(paddle.to_tensor(px[None, None]))
                inputs = self.vision.next_scale_inputs(codes)
                latent = self.vision.quantized_latent(codes)  # [1, d, T, L, L]: every scale of every frame
            return Segment(kind, role, codes=[c.numpy()[0] for c in codes], scale_inputs=[x.numpy()[0] for x in inputs],
                           frame_latent=latent.numpy()[0].transpose(1, 2, 3, 0))
        if kind == "audio":
            wav = read_wav(path, self.audio.cfg.sample_rate)
            hop = self.audio.cfg.hop
            padded = np.zeros(-(-len(wav) // hop) * hop, np.float32)
            padded[:len(wav)] = wav
            with paddle.no_grad():
                codes = self.audio.encode(paddle.to_tensor(padded[None]))
            return Segment("audio", role, audio_codes=codes.numpy()[0])
        raise UserError(f"segment kind {kind!r}", "expected text, image, video, audio or sep")

    def understanding_features(self, px_THW: np.ndarray) -> np.ndarray:
        """[T, h, w, C + P]: the tokenizer encoder's continuous features (the "CNN" path) and the raw pixels of
        each latent cell (P = (H/h)^2, the input of the model's ViT-style patch path)."""
        import paddle

        with paddle.no_grad():
            cnn = self.vision.features(paddle.to_tensor(px_THW[None, None])).numpy()[0]  # [T, h, w, C]
        T, H, _ = px_THW.shape
        h = cnn.shape[1]
        r = H // h
        pix = px_THW.reshape(T, h, r, h, r).transpose(0, 1, 3, 2, 4).reshape(T, h, h, r * r)
        return np.concatenate([cnn, pix], -1).astype(np.float32)

    @property
    def und_dims(self) -> tuple[int, int]:
        """(CNN feature channels, pixels per latent cell)."""
        c = self.vision.cfg
        side = c.latent_side
        return c.channels, (c.image_size // side) ** 2


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
