"""read_npy: every bad .npy gives one UserError naming the file."""

import numpy as np
import pytest

from ernie5.data.npy import read_npy
from ernie5.errors import UserError


def test_read_npy_errors_and_success(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((2, 3, 4), np.uint8))
    assert read_npy(good, "missing", ndim=3, layout="frames [T, H, W]").shape == (2, 3, 4)
    with pytest.raises(UserError, match="missing"):
        read_npy(tmp_path / "absent.npy", "missing")
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UserError, match="unreadable array"):
        read_npy(bad, "missing")
    with pytest.raises(UserError, match=r"expected clips \[N, T, H, W\], got shape \(2, 3, 4\)"):
        read_npy(good, "missing", ndim=4, layout="clips [N, T, H, W]")
    with pytest.raises(UserError) as e:
        read_npy(bad, "missing")
    assert str(bad) in str(e.value)
