"""Fused fp32 CPU kernels (`cpu_fused.cc`): built on first use with Paddle's C++ extension builder, cached.

Paddle's CPU build runs its elementwise, softmax and cross-entropy kernels on one thread, one op per pass over
memory. The training step's non-GEMM work is therefore done by small OpenMP kernels: RMSNorm, SwiGLU, RoPE,
the attention's masked softmax, the head's softmax cross-entropy (in place), the gradient norm and AdamW over
all parameters at once. `ernie5.kernels.fused` wraps them with their backward and `ernie5.optim.adamw.FusedAdamW`
uses the optimizer kernel; each has the plain-Paddle definition it replaces as its fallback and test reference.

`ops()` returns the compiled module, or None when the kernels are off: `ERNIE5_FUSED_KERNELS=0`, no C++
compiler, or a failed build (one stderr line naming the build log, then Paddle's ops). The build (~12 s)
happens once per source / Paddle install / Python / CPU, into `$ERNIE5_KERNEL_CACHE` (default
`~/.cache/ernie5/kernels`), under a file lock so that ranks starting together build it once. `-march=native`:
the cache key includes the CPU model. Only CPU float32 tensors use them (`usable`); GPU runs never build them.

`-ffp-contract=off` keeps the compiler from fusing multiplies and adds into FMA instructions, whose single
rounding would make results depend on the CPU: elementwise kernels (AdamW among them) give the same bits on every
x86-64 CPU, summations differ by their order only. `ERNIE5_KERNEL_ISA` (one of `ISA_VARIANTS`, default
`native`) builds for less than the native ISA, e.g. `avx2` (`-mno-avx512f`) or `avx2-nofma`; the variant is part
of the cache key and of the module name. Paddle registers the ops by name, so one process loads one variant (a
test runs the other in a subprocess).

The library links MKL's OpenMP runtime (libiomp5, shipped in Paddle's libs/), not GCC's libgomp: with two
runtimes each keeps its own spinning worker threads, and on 2 cores the GEMMs and these kernels then fought
for the cores (the bench step went from 0.58 s to 0.84 s); with one runtime they share one thread pool.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

SOURCE = Path(__file__).with_name("cpu_fused.cc")
CXX_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
# extra flags per ISA variant (after -march=native); -mno-avx512f also turns off every AVX-512 extension
ISA_VARIANTS = {
    "native": [],
    "avx2": ["-mno-avx512f"],
    "avx2-nofma": ["-mno-avx512f", "-mno-fma"],
    "avx": ["-mno-avx2", "-mno-fma"],
}
LD_FLAGS = ["-liomp5"]  # MKL's OpenMP runtime (Paddle's libs/, on the link path): one thread pool, see below
_STATE: dict = {"tried": False, "ops": None, "error": None}


def requested() -> bool:
    """False when the user turned the fused kernels off (ERNIE5_FUSED_KERNELS=0)."""
    return os.environ.get("ERNIE5_FUSED_KERNELS", "1") != "0"


def isa() -> str:
    """The ISA variant to build and load: $ERNIE5_KERNEL_ISA, default `native`."""
    name = os.environ.get("ERNIE5_KERNEL_ISA", "") or "native"
    if name not in ISA_VARIANTS:
        raise ValueError(f"ERNIE5_KERNEL_ISA={name!r} is not one of {sorted(ISA_VARIANTS)}")
    return name


def cxx_flags(variant: Optional[str] = None) -> list:
    """The compiler flags of an ISA variant (default: `isa()`)."""
    return CXX_FLAGS + ISA_VARIANTS[variant or isa()]


def module_name(variant: Optional[str] = None) -> str:
    variant = variant or isa()
    return "ernie5_cpu_fused" + ("" if variant == "native" else "_" + variant.replace("-", "_"))


def _cpu_model() -> str:
    """The CPU's model name and feature flags (what -march=native compiles for)."""
    found = {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags") and key not in found:
                    found[key] = line.strip()
                if len(found) == 2:
                    break
    except OSError:
        pass
    return " | ".join(found.values()) or platform.processor()


def build_key(variant: Optional[str] = None) -> str:
    """What the compiled library depends on: source, flags (with the ISA variant's), the Paddle install (version
    and path: the library links it by path), Python, the CPU."""
    import paddle

    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (cxx_flags(variant), LD_FLAGS, paddle.__version__, os.path.dirname(paddle.__file__), sys.version,
                 platform.machine(), _cpu_model()):
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def _private_dir(path: Path) -> Path:
    """`path` created 0700 and checked to be ours and closed to others: a shared temp dir must not let another
    user plant a library that this process would load."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path} is not a private directory of this user")
    return path


def cache_root() -> Path:
    """$ERNIE5_KERNEL_CACHE, else ~/.cache/ernie5/kernels, else (no writable home) a private per-user temp dir."""
    if os.environ.get("ERNIE5_KERNEL_CACHE"):
        return Path(os.environ["ERNIE5_KERNEL_CACHE"])
    try:
        home = Path.home() / ".cache" / "ernie5" / "kernels"
        home.mkdir(parents=True, exist_ok=True)
        return home
    except (OSError, RuntimeError):  # RuntimeError: no home directory at all
        return _private_dir(Path(tempfile.gettempdir()) / f"ernie5-kernels-{os.getuid()}")


@contextlib.contextmanager
def _quiet(log_path: Optional[Path]):
    """Paddle's builder logs and prints progress lines (also from its compiler subprocess) and warns about
    ccache. Logging and warnings are silenced; with `log_path`, the process's stdout / stderr also go to that
    file meanwhile, so the terminal shows at most one warning line."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            warnings.simplefilter("ignore")
            if log_path is not None:
                log = stack.enter_context(open(log_path, "w"))  # opened before any fd is touched
                sys.stdout.flush()
                sys.stderr.flush()
                saved = os.dup(1), os.dup(2)

                def restore():
                    sys.stdout.flush()
                    sys.stderr.flush()
                    for fd, copy in zip((1, 2), saved):
                        os.dup2(copy, fd)
                        os.close(copy)

                stack.callback(restore)
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
            yield
    finally:
        logger.setLevel(level)


def _build():
    from paddle.utils.cpp_extension import load

    variant = isa()
    where = cache_root() / build_key(variant)
    name = module_name(variant)
    if (where / "ready").exists():
        try:  # built before: import the library without `load`'s ~1 s setuptools up-to-date check (no lock
            # needed: `ready` is written after the build; works in a read-only shared cache too)
            from paddle.utils.cpp_extension.extension_utils import _import_module_from_library

            with _quiet(None):
                return _import_module_from_library(name, str(where / name))
        except Exception:  # a Paddle without that helper: the public path below
            pass
    where.mkdir(parents=True, exist_ok=True)
    with open(where / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent ranks: one builds, the others wait, then `load` finds it
        with _quiet(where / "build.log"):
            module = load(name=name, sources=[str(SOURCE)], extra_cxx_cflags=cxx_flags(variant),
                          extra_ldflags=LD_FLAGS, build_directory=str(where), verbose=False)
        (where / "ready").touch()
        return module


def _build_log() -> str:
    try:
        return str(cache_root() / build_key() / "build.log")
    except Exception:
        return "no build log"


def ops():
    """The compiled kernels' module, or None when they are off or could not be built (warned once)."""
    if not _STATE["tried"]:
        _STATE["tried"] = True
        if requested():
            try:
                _STATE["ops"] = _build()
            except Exception as e:  # no compiler, no source, no cache dir, ...: fall back to Paddle's ops
                first_line = (str(e).strip().splitlines() or [""])[0][:200]
                _STATE["error"] = f"{type(e).__name__}: {first_line} (log: {_build_log()})"
                print(f"ernie5: warning: fused CPU kernels unavailable, using Paddle's ops: {_STATE['error']}",
                      file=sys.stderr)
    return _STATE["ops"]


def status() -> str:
    """One word for reports: on, off (turned off by the user), failed (the build failed)."""
    ops()
    if _STATE["ops"] is not None:
        return "on"
    return "failed" if _STATE["error"] else "off"


def usable(*tensors) -> bool:
    """True when the fused kernels may run on these tensors: built, all on CPU, all float32."""
    import paddle

    if not tensors or not all(t.place.is_cpu_place() and t.dtype == paddle.float32 for t in tensors):
        return False  # checked first: GPU runs never build the CPU kernels
    return ops() is not None


@contextlib.contextmanager
def disabled():
    """Paddle's own ops inside the block, fused kernels or not (tests of the fallbacks, bench ablations)."""
    ops()
    saved = _STATE["ops"]
    _STATE["ops"] = None
    try:
        yield
    finally:
        _STATE["ops"] = saved
