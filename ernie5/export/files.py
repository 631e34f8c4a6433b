"""File plumbing shared by the exporters: atomic output dirs, (sharded) safetensors, reading checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from ernie5.env import strided_kernels
from ernie5.errors import UserError
from ernie5.tensor_io import write_safetensors_file
from ernie5.train.checkpoint import publish_dir

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3  # 2 GiB per file, well under what loaders mmap comfortably


def check_free(out_dir: Path) -> None:
    """Refuse an existing non-empty `out_dir` rather than replace it: it may hold something the user wants."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(str(out_dir), "already exists and is not an empty directory")


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temp dir beside `out_dir`; on success it becomes `out_dir` by one rename, on error it is removed."""
    out_dir = Path(out_dir)
    check_free(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        publish_dir(tmp, out_dir)  # swaps out an empty `out_dir` if there is one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      metadata: dict[str, str] | None = None, bf16: frozenset = frozenset()) -> list[str]:
    """Write `model.safetensors`, or shards plus `model.safetensors.index.json` when over `max_shard_bytes`.
    The floating tensors named in `bf16` are stored as BF16 (rounded to nearest even)."""
    meta = {"format": "pt", **(metadata or {})}  # transformers checks format == "pt" for numpy-written files
    stored = {k: 2 * v.size if k in bf16 and np.issubdtype(v.dtype, np.floating) else v.nbytes
              for k, v in tensors.items()}
    total = sum(stored.values())
    if total <= max_shard_bytes:
        write_safetensors_file(tensors, out_dir / SINGLE_FILE, meta, bf16)
        return [SINGLE_FILE]
    shards: list[list[str]] = [[]]
    size = 0
    for name in tensors:  # in model order, so one layer's tensors mostly share a file
        if shards[-1] and size + stored[name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += stored[name]
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_file({n: tensors[n] for n in names}, out_dir / fname, meta, bf16)
        files.append(fname)
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return files + [INDEX_FILE]


EXPORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # export dtype -> the stored floating type's name


def bf16_names(tensors: dict[str, np.ndarray], dtype: str, keep_fp32) -> frozenset:
    """The floating tensors to store as bf16 under export `dtype` ("fp32" or "bf16"): none for fp32; for bf16 all
    but the `keep_fp32(name)` ones (the router, as in training)."""
    if dtype not in EXPORT_DTYPES:
        raise UserError("--dtype", f"{dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    if dtype == "fp32":
        return frozenset()
    return frozenset(k for k, v in tensors.items() if np.issubdtype(np.asarray(v).dtype, np.floating)
                     and not keep_fp32(k))


def _read_file(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy; bf16/fp16 become fp32 (numpy has no bf16)."""
    from safetensors import safe_open

    out = {}
    try:
        # the paddle backend reads BF16 (public ERNIE 4.5 weights are bf16); the numpy one cannot. It views
        # bytes as tensors, which needs Paddle's strided kernels (off in ernie5 processes: ernie5/env.py)
        with safe_open(str(path), framework="paddle") as f, strided_kernels():
            for name in f.keys():
                t = f.get_tensor(name)
                if t.is_floating_point():
                    t = t.astype("float32")
                out[name] = t.numpy()
    except Exception as e:  # safetensors raises its own error types for bad headers / truncated files
        raise UserError(str(path), f"not a readable safetensors file ({type(e).__name__}: {e})") from None
    return out


def read_safetensors_dir(src: Path) -> dict[str, np.ndarray]:
    """Every tensor in `src` (one `model.safetensors` or the shards an index names)."""
    index = src / INDEX_FILE
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise UserError(str(index), f"unreadable index ({e})") from None
    elif (src / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise UserError(str(src), f"no {SINGLE_FILE} or {INDEX_FILE}")
    tensors = {}
    for name in files:
        if not (src / name).is_file():
            raise UserError(str(src / name), "shard named in the index is missing")
        tensors.update(_read_file(src / name))
    return tensors


def state_to_numpy(state: dict) -> dict[str, np.ndarray]:
    """A Paddle state dict as numpy; floating tensors as fp32 (CPU training is fp32; bf16 has no numpy dtype)."""
    out = {}
    for k, v in state.items():
        if hasattr(v, "numpy"):
            v = v.astype("float32") if v.is_floating_point() else v
            v = v.numpy()
        out[k] = np.asarray(v)
    return out


def read_checkpoint(path: str):
    """(checkpoint dir, RunConfig, numpy state) of an ernie5 checkpoint, run dir or native export."""
    from ernie5.runconfig import load_config
    from ernie5.train.checkpoint import load_model_weights, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    cfg = load_config(ckpt / "config.yaml")
    return ckpt, cfg, state_to_numpy(load_model_weights(ckpt))
