"""State dicts as safetensors files: tensors as tensors, other entries as JSON in the header. Nothing read here
can run code (no pickle). Bottom layer: numpy and safetensors; paddle only for bf16 tensors.

bf16 has no numpy dtype. `save_tensors` stores a bf16 paddle tensor widened to fp32 (exact) and marks it, so it
loads back as bf16; `write_safetensors_file` stores chosen fp32 arrays as real BF16 entries (exports: what
Hugging Face loaders expect), which `load_tensors` reads back as fp32 arrays holding the bf16 values.

`pickle_allowed` is the one place that reads the user's opt-in (`ERNIE5_ALLOW_PICKLE=1`) to unpickling legacy
files; the callers that still can read such files check it first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ernie5.errors import UserError

ALLOW_PICKLE_ENV = "ERNIE5_ALLOW_PICKLE"
_META_DTYPES = "ernie5.dtypes"  # safetensors header keys: original dtypes of tensors stored widened ...
_META_JSON = "ernie5.json"  # ... and non-tensor entries of the state dict


def _to_numpy(value) -> tuple[np.ndarray, Optional[str]]:
    """(array to store, original dtype name if it had to be widened). bf16 has no numpy dtype: fp32 holds every
    bf16 value exactly, so it is stored as fp32 and cast back on load."""
    if hasattr(value, "numpy") and hasattr(value, "dtype") and not isinstance(value, np.ndarray):
        import paddle

        if value.dtype == paddle.bfloat16:
            return np.ascontiguousarray(value.astype("float32").numpy()), "bfloat16"
        value = value.numpy()
    return np.ascontiguousarray(value), None


def _is_tensor(value) -> bool:
    return isinstance(value, np.ndarray) or (hasattr(value, "numpy") and hasattr(value, "shape"))


def save_tensors(state: dict) -> Callable[[Path], None]:
    """Writer of a state dict as one safetensors file. Tensors (paddle or numpy) are stored as tensors; other
    entries must be JSON values and go into the header metadata."""
    def write(path: Path) -> None:
        from safetensors.numpy import save_file

        tensors, widened, extra = {}, {}, {}
        for k, v in state.items():
            if _is_tensor(v):
                tensors[k], orig = _to_numpy(v)
                if orig:
                    widened[k] = orig
            else:
                try:
                    json.dumps(v)
                except (TypeError, ValueError):
                    raise TypeError(f"state entry {k!r} ({type(v).__name__}) is neither a tensor nor JSON") \
                        from None
                extra[k] = v
        meta = {"format": "ernie5"}
        if widened:
            meta[_META_DTYPES] = json.dumps(widened)
        if extra:
            meta[_META_JSON] = json.dumps(extra)
        save_file(tensors, str(path), metadata=meta)
    return write



def bf16_bits(a: np.ndarray) -> np.ndarray:
    """The bf16 bit patterns (uint16) of `a` rounded to nearest even (Paddle's cast, as in training)."""
    import paddle

    return np.ascontiguousarray(paddle.to_tensor(np.asarray(a, np.float32)).astype(paddle.bfloat16).numpy()
                                .view(np.uint16))


def write_safetensors_file(tensors: dict[str, np.ndarray], path: Path, metadata: Optional[dict] = None,
                           bf16: frozenset = frozenset()) -> None:
    """One safetensors file of numpy arrays; the floating arrays named in `bf16` are rounded to bf16 and stored
    as BF16 entries (2 bytes a value)."""
    import safetensors

    arrays, dtypes = {}, {}
    for k, v in tensors.items():
        v = np.asarray(v)
        if k in bf16 and np.issubdtype(v.dtype, np.floating):
            arrays[k], dtypes[k] = bf16_bits(v), "bfloat16"
        else:
            arrays[k] = np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("<"))  # the format is little-endian
            dtypes[k] = arrays[k].dtype.name
    if hasattr(safetensors, "TensorSpec"):  # safetensors >= 0.8: tensors by pointer
        specs = {k: safetensors.TensorSpec(dtype=dtypes[k], shape=list(a.shape), data_ptr=a.ctypes.data,
                                           data_len=a.nbytes) for k, a in arrays.items()}
    else:  # earlier versions take the bytes (not exercised here)
        specs = {k: {"dtype": dtypes[k], "shape": list(a.shape), "data": a.tobytes()} for k, a in arrays.items()}
    safetensors.serialize_file(specs, str(path), metadata=metadata)


def is_safetensors(path: Path) -> bool:
    """True if `path` starts like a safetensors file (8-byte little-endian header length, then a JSON object)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000 and head[8:9] == b"{"


def load_tensors(path: Path) -> dict[str, Any]:
    """A state dict written by `save_tensors` (or any safetensors file): {name: numpy array or JSON value}.
    Never unpickles anything."""
    from safetensors import safe_open

    if not is_safetensors(path):
        raise UserError(str(path), "not a safetensors file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            bf16 = {k for k in keys if f.get_slice(k).get_dtype() == "BF16"}
            out: dict[str, Any] = {k: f.get_tensor(k) for k in keys if k not in bf16}
        if bf16:
            out.update(_read_bf16_as_fp32(path, bf16))
        widened = json.loads(meta.get(_META_DTYPES, "{}"))
        extra = json.loads(meta.get(_META_JSON, "{}"))
    except Exception as e:  # safetensors raises its own types for bad headers / truncated files
        raise UserError(str(path), f"cannot load ({type(e).__name__}: {str(e).splitlines()[0][:120]})") \
            from None
    if not isinstance(widened, dict) or not isinstance(extra, dict):
        raise UserError(str(path), "malformed ernie5 metadata in the safetensors header")
    if widened:
        import paddle

        for k, dtype in widened.items():
            if k not in out or dtype != "bfloat16":
                raise UserError(str(path), f"malformed ernie5 metadata in the safetensors header ({k!r})")
            out[k] = paddle.to_tensor(out[k]).astype(paddle.bfloat16)
    out.update(extra)
    return out


def _read_bf16_as_fp32(path: Path, keys) -> dict[str, np.ndarray]:
    """BF16 entries as fp32 arrays (exact), through safetensors' paddle backend (numpy's cannot read BF16)."""
    import paddle
    from safetensors import safe_open

    from ernie5.env import strided_kernels

    with safe_open(str(path), framework="paddle") as f, strided_kernels():
        return {k: f.get_tensor(k).astype(paddle.float32).numpy() for k in keys}


def pickle_allowed(allow_pickle: bool = False) -> bool:
    """The user's opt-in to unpickling legacy files: the run config flag or ERNIE5_ALLOW_PICKLE=1."""
    return allow_pickle or os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def load_state_file(path: Path, allow_pickle: bool = False, what: str = "checkpoint",
                    how_to_allow: str = f"{ALLOW_PICKLE_ENV}=1", remedy: str = "") -> dict:
    """A state dict from `path`: safetensors content is read as such whatever the file is called, and a
    `.safetensors` name is never unpickled; anything else is a legacy `paddle.save` pickle, loaded only after
    the user's opt-in (`allow_pickle` or the environment) and otherwise refused in one line naming `what` and
    `how_to_allow`."""
    path = Path(path)
    if is_safetensors(path) or path.suffix == ".safetensors":
        return load_tensors(path)
    if not pickle_allowed(allow_pickle):
        raise UserError(str(path), f"legacy pickle {what}; loading it can run code, set {how_to_allow} only if you "
                                   f"trust its source{remedy}")
    import paddle

    try:
        return paddle.load(str(path))
    except Exception as e:  # paddle raises assorted types for bad files
        raise UserError(str(path), f"cannot load ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
