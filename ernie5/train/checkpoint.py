"""Atomic, self-describing step checkpoints, stored in formats that cannot run code when loaded.

Layout of `checkpoints/step_<8-digit step>/`:

- `model.safetensors`: the weights (global names, fp32 as trained; a bf16 tensor is stored as its exact fp32
  value and cast back on load). With several ranks each rank writes its share, rank 0 as `model.safetensors`
  and rank N as `model.rankN.safetensors`, all under global names, so any EP / DP layout (or one process)
  loads the union.
- `optimizer.safetensors` / `optimizer.rankN.safetensors`: AdamW accumulators as `<global name>::<slot>`.
  Non-tensor entries, if a state dict has any, go as JSON into the safetensors header metadata.
- `rng.json`: paddle's generator states (seed, offset and the Mersenne-Twister engine state as text).
- `trainer_state.json` (step, data loader position, spike / rollback counters, ...), the run's resolved
  `config.yaml`, and `manifest.json` (sha256 and size of every other file).

A native export (`ernie5 export --format native`) has the same manifest and `model.safetensors`, so it loads
through the same code. A checkpoint is written into a `.tmp-` sibling dir, every file fsynced, then renamed
into place, so a directory named `step_*` with a manifest is complete. On load the manifest is verified; a
checkpoint that fails is skipped (with a warning) in favour of the previous one. Leftover temp dirs are removed
at start.

Older checkpoints held pickles (`model.pdparams`, `optimizer.pdopt`, `rng.pkl`). Unpickling a file can run
arbitrary code, so they load only when the user opts in (`checkpoint.allow_pickle: true` in the run config, or
`ERNIE5_ALLOW_PICKLE=1` in the environment) and are otherwise refused with a one-line error, before any byte
of them is unpickled. A safetensors file is never unpickled, whatever its name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ernie5.data.shards import sha256_file
from ernie5.errors import UserError
from ernie5.tensor_io import ALLOW_PICKLE_ENV, load_state_file, load_tensors, pickle_allowed

MANIFEST = "manifest.json"
TENSORS = ".safetensors"
RNG_FILE = "rng.json"
# suffixes of the pickle files older checkpoints used, per stem; only read with the opt-in
LEGACY_SUFFIX = {"model": ".pdparams", "optimizer": ".pdopt"}
LEGACY_RNG_FILE = "rng.pkl"
_HOW_TO_ALLOW = f"checkpoint.allow_pickle=true (or {ALLOW_PICKLE_ENV}=1)"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(ckpt_root: Path, step: int, writers: dict[str, Callable[[Path], None]],
                     keep_last: int, pause_s: float = 0.0) -> Path:
    """Write one checkpoint atomically. `writers` maps file name -> function writing that file.

    `pause_s` (fault injection, `faults.slow_checkpoint_s`) sleeps after each file to widen the kill-mid-save window.
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = write_checkpoint_dir(ckpt_root / step_dir_name(step), step, writers, pause_s)
    prune_checkpoints(ckpt_root, keep_last)
    return final


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints."""
    for stale in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)


def write_checkpoint_dir(final: Path, step: int, writers: dict[str, Callable[[Path], None]],
                         pause_s: float = 0.0) -> Path:
    """Write the files and a manifest into a temp dir beside `final`, then rename it to `final`."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_files(tmp, writers, pause_s)
    finalize_checkpoint_dir(tmp, final, step)
    return final


def write_files(tmp: Path, writers: dict[str, Callable[[Path], None]], pause_s: float = 0.0) -> None:
    """Each writer writes its file into `tmp`; every file is fsynced (a rank of a multi-rank save calls this)."""
    for name, write in writers.items():
        path = tmp / name
        write(path)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        if pause_s:
            time.sleep(pause_s)


def finalize_checkpoint_dir(tmp: Path, final: Path, step: int) -> None:
    """Manifest (size + sha256) over every file in `tmp`, then publish it as `final`."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(tmp.iterdir()) if f.is_file() and f.name != MANIFEST}
    with open(tmp / MANIFEST, "w") as f:
        json.dump({"format": 1, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    publish_dir(tmp, final)


def publish_dir(tmp: Path, final: Path) -> None:
    """fsync `tmp` and rename it to `final`; an existing `final` is swapped out, never left missing."""
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. after a rollback): swap, never leave a gap with no checkpoint
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete-looking checkpoint dirs (named step_*, with a manifest), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if _STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def clean_partial(ckpt_root: Path) -> list[Path]:
    """Remove temp / swap dirs left by a crash mid-save."""
    removed = []
    if ckpt_root.is_dir():
        for p in sorted(ckpt_root.iterdir()):  # a crash between the two renames of a re-save: put the old one back
            m = re.match(r"^\.old-(step_\d{8})-\d+$", p.name)
            if m and not (ckpt_root / m.group(1) / MANIFEST).is_file():
                shutil.rmtree(ckpt_root / m.group(1), ignore_errors=True)
                p.rename(ckpt_root / m.group(1))
        for p in ckpt_root.iterdir():
            if p.name.startswith((".tmp-", ".old-")) or (_STEP_DIR.match(p.name) and not (p / MANIFEST).is_file()):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def verify_checkpoint(path: Path) -> Optional[str]:
    """None if every file matches the manifest, else the reason it does not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({e})"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, manifest says {want['bytes']}"
        if sha256_file(f) != want["sha256"]:
            return f"{name} checksum mismatch"
    return None


def latest_valid_checkpoint(ckpt_root: Path, warn=lambda msg: print(msg, file=sys.stderr)) -> Optional[Path]:
    """Newest checkpoint that verifies; corrupted ones are reported and skipped."""
    for path in reversed(list_checkpoints(ckpt_root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"warning: skipping corrupted checkpoint {path}: {problem}")
    return None


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint dir (or a native export, which has the same manifest), or a run dir (its newest valid one)."""
    p = Path(path)
    if not p.exists():
        raise UserError(str(p), "no such checkpoint or run directory")
    if (p / MANIFEST).is_file():
        problem = verify_checkpoint(p)
        if problem:
            raise UserError(str(p), f"corrupted checkpoint: {problem}")
        return p
    found = latest_valid_checkpoint(p / "checkpoints")
    if found is None:
        raise UserError(str(p), "no complete checkpoint found (expected manifest.json or checkpoints/step_*)")
    return found


def save_json(obj) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(json.dumps(obj, indent=1))
    return write


def save_text(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text, encoding="utf-8")


def json_load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(str(path), f"unreadable ({e})") from None


def refuse_pickle(path: Path, allow_pickle: bool = False) -> None:
    """UserError unless the user opted in to loading the pickle at `path`."""
    if not pickle_allowed(allow_pickle):
        raise UserError(str(path), f"legacy pickle checkpoint; loading it can run code, set {_HOW_TO_ALLOW} only "
                                   "if you trust its source")


def _load_legacy(path: Path, allow_pickle: bool) -> dict:
    """A legacy `paddle.save` pickle of a checkpoint, after the opt-in check (safetensors content read as such)."""
    return load_state_file(path, allow_pickle, "checkpoint", _HOW_TO_ALLOW)


def rank_file(stem: str, suffix: str, rank: int) -> str:
    """Per-rank file names: rank 0 keeps the plain name (`model.safetensors`), others `model.rank3.safetensors`."""
    return f"{stem}{suffix}" if rank == 0 else f"{stem}.rank{rank}{suffix}"


def _shares(ckpt: Path, stem: str, suffix: str) -> list[Path]:
    """`stem{suffix}` (if present) and every `stem.rankN{suffix}`."""
    files = [ckpt / f"{stem}{suffix}"] if (ckpt / f"{stem}{suffix}").is_file() else []
    return files + sorted(p for p in ckpt.glob(f"{stem}.rank*{suffix}") if re.fullmatch(
        rf"{re.escape(stem)}\.rank\d+{re.escape(suffix)}", p.name))


def load_merged(ckpt: Path, stem: str, allow_pickle: bool = False) -> dict:
    """Union of `stem.safetensors` and every `stem.rankN.safetensors` (each a disjoint share, global names).

    A checkpoint with no safetensors share falls back to the legacy pickles (`stem.pdparams` / `.pdopt` and
    their rank shares), which need the opt-in."""
    files = _shares(ckpt, stem, TENSORS)
    legacy = not files
    if legacy:
        files = _shares(ckpt, stem, LEGACY_SUFFIX.get(stem, ".pdparams"))
    if not files:
        raise UserError(str(ckpt), f"no {stem}{TENSORS} in this checkpoint")
    merged: dict = {}
    for f in files:
        merged.update(_load_legacy(f, allow_pickle) if legacy else load_tensors(f))
    return merged


def load_model_weights(ckpt: Path, allow_pickle: bool = False) -> dict:
    """Model weights (global names) of a training checkpoint, single- or multi-rank, or of a native export.
    safetensors files always win over legacy pickles in the same directory."""
    return load_merged(ckpt, "model", allow_pickle)


# ---- RNG state: JSON -------------------------------------------------------------------------------------

def rng_state() -> dict:
    """paddle's generator states as JSON values, exactly: each GeneratorState's own (device, seed, offset,
    engine) tuple, the engine being the Mersenne-Twister state in its standard text form."""
    import paddle

    gens = []
    for g in paddle.get_rng_state():
        device, seed, offset, engine = g.__getstate__()
        gens.append({"device": int(device), "seed": int(seed), "offset": int(offset),
                     "engine": bytes(engine).decode("ascii")})
    return {"format": 1, "paddle": gens}


def save_rng() -> Callable[[Path], None]:
    return save_json(rng_state())


_ENGINE_TEXT = re.compile(r"[0-9 ]{1,100000}")


def set_rng_state(state: dict, where: str) -> None:
    """Restore what `rng_state` captured; anything malformed is a UserError, not a crash inside paddle."""
    import paddle

    try:
        gens = state["paddle"]
        current = paddle.get_rng_state()
        if state.get("format") != 1 or not isinstance(gens, list) or len(gens) != len(current):
            raise ValueError(f"expected {len(current)} generator state(s)")
        cls = type(current[0])
        want_words = len(bytes(current[0].__getstate__()[3]).split())
        restored = []
        for g in gens:
            fields = (g["device"], g["seed"], g["offset"])
            if not all(isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**64 for v in fields):
                raise ValueError("device / seed / offset must be 64-bit integers")
            if not isinstance(g["engine"], str) or not _ENGINE_TEXT.fullmatch(g["engine"]):
                raise ValueError("engine state must be decimal numbers separated by spaces")
            if len(g["engine"].split()) != want_words:  # paddle would accept a short one and run on garbage
                raise ValueError(f"engine state has {len(g['engine'].split())} numbers, expected {want_words}")
            obj = cls.__new__(cls)
            obj.__setstate__((*fields, list(g["engine"].encode("ascii"))))
            restored.append(obj)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise UserError(where, f"malformed RNG state ({type(e).__name__}: {e})") from None
    paddle.set_rng_state(restored)


def load_rng(ckpt: Path, allow_pickle: bool = False) -> None:
    """Restore the RNG state of a checkpoint: `rng.json`, or a legacy `rng.pkl` with the opt-in."""
    if (ckpt / RNG_FILE).is_file() or not (ckpt / LEGACY_RNG_FILE).is_file():
        set_rng_state(json_load(ckpt / RNG_FILE), str(ckpt / RNG_FILE))
        return
    path = ckpt / LEGACY_RNG_FILE
    refuse_pickle(path, allow_pickle)
    import pickle

    import paddle

    try:
        with open(path, "rb") as f:
            paddle.set_rng_state(pickle.load(f)["paddle"])
    except Exception as e:  # anything the pickle holds may be wrong
        raise UserError(str(path), f"cannot load ({type(e).__name__}: {str(e).splitlines()[0][:120]})") \
            from None


def apply_model_state(model, state: dict, where: str) -> None:
    """Load weights after checking names and shapes, so an incompatible checkpoint is a clear error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(where, f"checkpoint does not match the model config ({detail})")
    for k, v in own.items():
        if list(v.shape) != list(state[k].shape):
            raise UserError(where, f"checkpoint does not match the model config ({k}: checkpoint "
                                   f"{list(state[k].shape)} vs model {list(v.shape)})")
    model.set_state_dict(state)


def build_model_from_checkpoint(ckpt_dir, cfg=None, allow_pickle: bool = False):
    """The model of a checkpoint directory (already resolved, see `resolve_checkpoint`) with its weights, in eval
    mode. `cfg`: the run config to build from (default: the `config.yaml` saved with the checkpoint; callers that
    apply overrides load it themselves). The FP8 setting is the run's, as trained: FP8 GEMMs change the numbers.
    Weights are checked against the model's names and shapes (`apply_model_state`)."""
    from ernie5.model.transformer import build_model
    from ernie5.runconfig import load_config

    ckpt = Path(ckpt_dir)
    if cfg is None:
        cfg = load_config(ckpt / "config.yaml")
    model = build_model(cfg.model, fp8=cfg.precision.fp8)
    apply_model_state(model, load_model_weights(ckpt, allow_pickle), str(ckpt))
    model.eval()
    return model


def load_model(path: str):
    """Build the model a checkpoint (or a run dir's newest) was trained with and load its weights; eval mode."""
    return build_model_from_checkpoint(resolve_checkpoint(path))
