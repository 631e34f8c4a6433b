"""Decoding media into float arrays in [-1, 1] with the usual libraries, from a file or from raw bytes (a tar
member). Every failure is a one-line `UserError(name, reason)` naming the file or member; nothing escapes as a
traceback.

- images: Pillow (any format it reads). EXIF orientation is applied. Palette, bilevel, CMYK, YCbCr, HSV and
  LAB images become RGB; transparency (an alpha band or a palette's transparent entry) is composited over
  white; 16-bit and 32-bit grayscale keep their precision (scaled from 0..65535). Then L (ITU-R 601 luma, as
  Pillow computes it) or RGB.
- audio: `soundfile` (libsndfile: WAV, FLAC, OGG Vorbis / Opus, MP3 with libsndfile >= 1.1) first, PyAV
  (FFmpeg) for every other container and codec. Channels are averaged to mono, the rate converted with soxr
  (quality HQ) and the result clipped to [-1, 1]. A WAV whose data chunk is shorter than its header says
  (a truncated download) is refused: libsndfile would silently return the part that is there.
- video: `.npy` uint8 frames [T, H, W] or [T, H, W, C] (loaded with allow_pickle=False), or any container PyAV
  decodes (frames converted to RGB, then to luma when one channel is asked for).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Union

import numpy as np

from ernie5.errors import UserError

Source = Union[Path, str, bytes]

NPY_MAGIC = b"\x93NUMPY"
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, the weights of Pillow's RGB -> L


def _open(src: Source, name: str, what: str):
    """A path (checked to exist) or a binary stream over the bytes."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise UserError(name, f"empty {what} file")
        return io.BytesIO(bytes(src))
    path = Path(src)
    if not path.is_file():
        raise UserError(name, f"{what} file missing")
    return path


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "<bytes>", text)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ------------------------------------------------------------------------------------------------------------ images

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_DEPTH = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def decode_image(src: Source, name: str, channels: int) -> np.ndarray:
    """float32 [H, W, channels] in [-1, 1]; `channels` 1 (luma) or 3 (RGB, grayscale replicated)."""
    if channels not in (1, 3):
        raise UserError(name, f"channels={channels}: images decode to 1 (grayscale) or 3 (RGB) channels")
    f = _open(src, name, "image")
    from PIL import Image, ImageOps

    try:
        with Image.open(f) as im:
            im = ImageOps.exif_transpose(im)
            return _image_pixels(im, channels)
    except MemoryError:
        raise
    except Image.DecompressionBombError as e:
        raise UserError(name, f"image too large ({e})") from None
    except Exception as e:  # any decoder failure (OSError, SyntaxError, struct.error, ...) is the file's fault
        raise UserError(name, f"corrupt or unsupported image ({_describe(e)})") from None


def _image_pixels(im, channels: int) -> np.ndarray:
    from PIL import Image

    if im.mode in _HIGH_DEPTH or im.mode == "F":
        scale = 1.0 if im.mode == "F" else 65535.0  # "I" is how 16-bit data reaches Pillow from TIFF and PGM
        gray = np.clip(np.asarray(im, np.float64) / scale, 0.0, 1.0)
        x = (gray * 2.0 - 1.0).astype(np.float32)[..., None]
        return np.repeat(x, channels, axis=-1)
    if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
    elif im.mode not in ("L", "RGB"):
        im = im.convert("RGB")  # P, 1, CMYK, YCbCr, HSV, LAB
    im = im.convert("L" if channels == 1 else "RGB")
    px = np.asarray(im, np.float32).reshape(im.size[1], im.size[0], channels)
    return px / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------------------- audio

def decode_audio(src: Source, name: str, sample_rate: int) -> np.ndarray:
    """float32 [n] mono in [-1, 1] at `sample_rate`."""
    f = _open(src, name, "audio")
    try:
        samples, rate = _soundfile_read(f, name)
    except UserError:
        raise
    except MemoryError:
        raise
    except Exception as e_sf:  # libsndfile does not know the format: let FFmpeg try
        if isinstance(f, io.BytesIO):
            f.seek(0)
        try:
            samples, rate = _av_read_audio(f, name)
        except UserError:
            raise
        except MemoryError:
            raise
        except Exception as e_av:
            raise UserError(name, f"corrupt or unsupported audio (soundfile: {_describe(e_sf)}; "
                                  f"av: {_describe(e_av)})") from None
    if samples.size == 0:
        raise UserError(name, "empty audio")
    if not np.isfinite(samples).all():
        raise UserError(name, "audio has NaN or infinite samples")
    mono = samples.mean(axis=1, dtype=np.float64).astype(np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if rate != sample_rate:
        import soxr

        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
        if mono.size == 0:
            raise UserError(name, f"audio too short to resample from {rate} Hz to {sample_rate} Hz")
    return np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False)


_DATA_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_STREAMED_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)  # placeholders of writers that could not seek back


def _soundfile_read(f, name: str) -> tuple[np.ndarray, int]:
    """([n, channels] float32, rate) with libsndfile; UserError for a truncated WAV."""
    import soundfile

    with soundfile.SoundFile(f if isinstance(f, io.BytesIO) else str(f)) as sf:
        if sf.format in ("WAV", "WAVEX", "RF64", "W64"):
            m = _DATA_CHUNK.search(sf.extra_info)
            if m and int(m.group(1)) not in _STREAMED_SIZES and int(m.group(2)) < int(m.group(1)):
                raise UserError(name, f"truncated audio (the header says {m.group(1)} data bytes, "
                                      f"the file has {m.group(2)})")
        return sf.read(dtype="float32", always_2d=True), int(sf.samplerate)


def _av_read_audio(f, name: str) -> tuple[np.ndarray, int]:
    import av

    with av.open(f if isinstance(f, io.BytesIO) else str(f)) as container:
        if not container.streams.audio:
            raise UserError(name, "no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp")  # float planar, the source's own layout and rate
        parts, rate = [], None
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                parts.append(out.to_ndarray())
                rate = out.sample_rate
        for out in resampler.resample(None):
            parts.append(out.to_ndarray())
            rate = out.sample_rate
    if not parts:
        return np.zeros((0, 1), np.float32), int(stream.rate or 1)
    return np.concatenate(parts, axis=1).T.astype(np.float32, copy=False), int(rate)


# ------------------------------------------------------------------------------------------------------------- video

def decode_video(src: Source, name: str, channels: int, max_frames: int | None = None) -> np.ndarray:
    """float32 [T, H, W, channels] in [-1, 1]: the first `max_frames` frames (all when None)."""
    if channels not in (1, 3):
        raise UserError(name, f"channels={channels}: videos decode to 1 (grayscale) or 3 (RGB) channels")
    if max_frames is not None and max_frames < 1:
        raise UserError(name, f"max_frames={max_frames} must be >= 1")
    f = _open(src, name, "video")
    is_npy = bytes(src[:6]) == NPY_MAGIC if isinstance(f, io.BytesIO) else Path(f).suffix.lower() == ".npy"
    frames = _npy_frames(f, name, max_frames) if is_npy else _av_frames(f, name, max_frames)
    if frames.shape[0] == 0:
        raise UserError(name, "no video frames")
    return _to_channels(frames, channels)


def _npy_frames(f, name: str, max_frames: int | None) -> np.ndarray:
    """uint8 [T, H, W, C] from an .npy array [T, H, W] or [T, H, W, C] (C = 1 or 3)."""
    try:
        arr = np.load(f, allow_pickle=False, mmap_mode=None if isinstance(f, io.BytesIO) else "r")
    except MemoryError:
        raise
    except Exception as e:
        raise UserError(name, f"unreadable video array ({_describe(e)})") from None
    if arr.dtype != np.uint8:
        raise UserError(name, f"video frames must be uint8, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise UserError(name, f"expected frames [T, H, W] or [T, H, W, C] with C 1 or 3, got shape {arr.shape}")
    return np.asarray(arr[:max_frames] if max_frames else arr)


def _av_frames(f, name: str, max_frames: int | None) -> np.ndarray:
    import av

    frames = []
    try:
        with av.open(f if isinstance(f, io.BytesIO) else str(f)) as container:
            if not container.streams.video:
                raise UserError(name, "no video stream")
            for frame in container.decode(container.streams.video[0]):
                rgb = frame.to_ndarray(format="rgb24")
                if frames and rgb.shape != frames[0].shape:
                    raise UserError(name, f"frame size changes from {frames[0].shape[:2]} to {rgb.shape[:2]}")
                frames.append(rgb)
                if max_frames and len(frames) >= max_frames:
                    break
    except (UserError, MemoryError):
        raise
    except Exception as e:
        raise UserError(name, f"corrupt or unsupported video ({_describe(e)})") from None
    return np.stack(frames) if frames else np.zeros((0, 1, 1, 3), np.uint8)


def read_frames(path: Path, frame_step: int = 1, fmt: str = "rgb24", max_side: int | None = None) -> np.ndarray:
    """Every `frame_step`-th frame of a video file as uint8: [T, H, W, 3] (`fmt` "rgb24") or [T, H, W] ("gray"),
    shrunk so the short side is at most `max_side` (None: as stored). UserError naming the file if PyAV is
    missing or the file is missing, empty of video or undecodable."""
    try:
        import av
    except ImportError:
        raise UserError("av", "not installed (pip install -e .[demo]); it decodes video files") from None
    path = Path(path)
    if not path.is_file():
        raise UserError(str(path), "video file missing")
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(str(path), "no video stream")
            for i, frame in enumerate(container.decode(video=0)):
                if i % frame_step:
                    continue
                scale = 1.0 if max_side is None else min(1.0, max_side / min(frame.height, frame.width))
                w, h = round(frame.width * scale), round(frame.height * scale)
                frames.append(frame.reformat(width=w, height=h, format=fmt).to_ndarray())
    except (UserError, MemoryError):
        raise
    except Exception as e:
        raise UserError(str(path), f"corrupt or unreadable video ({_describe(e)})") from None
    if not frames:
        raise UserError(str(path), "corrupt video: no frame could be decoded")
    return np.stack(frames)


def _to_channels(frames_THWC: np.ndarray, channels: int) -> np.ndarray:
    x = frames_THWC.astype(np.float32)
    if x.shape[-1] == 3 and channels == 1:
        x = (x @ LUMA)[..., None]
    elif x.shape[-1] == 1 and channels == 3:
        x = np.repeat(x, 3, axis=-1)
    return x / 127.5 - 1.0
