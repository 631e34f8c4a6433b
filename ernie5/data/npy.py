"""Reading one .npy file with one-line user errors (missing, unreadable, wrong rank) instead of tracebacks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ernie5.errors import UserError


def read_npy(path: Path, missing: str, ndim: Optional[int] = None, layout: str = "") -> np.ndarray:
    """np.load(path): UserError `missing` if the file is absent, one naming the problem if it does not parse or
    (with `ndim`) has another rank than `layout` describes."""
    if not path.is_file():
        raise UserError(str(path), missing)
    try:
        arr = np.load(path)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(str(path), f"unreadable array ({type(e).__name__}: {e})") from None
    if ndim is not None and arr.ndim != ndim:
        raise UserError(str(path), f"expected {layout}, got shape {arr.shape}")
    return arr
