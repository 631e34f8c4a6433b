"""Process setup for ernie5: CPU thread settings applied before paddle loads, and a quiet paddle import.

`setup()` is an explicit call, made first by the CLI (`ernie5.cli.main`), the test suite's conftest,
`ernie5.load_model` and the multi-process worker scripts; importing ernie5 changes nothing in the process.
Call it yourself before `import paddle` when using ernie5 as a library.

`import paddle` pins OMP_NUM_THREADS=1 when it is unset, and MKL picks a slow path on AMD CPUs unless
MKL_DEBUG_CPU_TYPE=5; either alone costs ~5x in fp32 GEMM on 2 cores. The user's own settings always win.
With more than one thread paddle prints a two-line OMP banner on stderr at import; it is dropped (only those
lines) so that a user error stays one line.

Freed memory is kept for reuse (`retain_freed_memory`): paddle's CPU allocator hands every tensor straight to
malloc, and glibc serves blocks above its mmap threshold (128 KiB to 32 MiB, adaptive) with fresh mmaps that
are returned on free, so every large activation, logits tensor and gradient page-faults its memory in again
on each step. On 2 cores that made a copy of a [1024, 32000] fp32 tensor 76 ms instead of 11 ms, and the
small bench step 0.64 s instead of 0.57 s (benchmarks/README.md).
"""

import contextlib
import ctypes
import io
import os
import sys
import warnings

MALLOC_RETAINED = False  # whether `setup` applied `retain_freed_memory`
_BANNER = ("WARNING: OMP_NUM_THREADS set to", "PLEASE USE OMP_NUM_THREADS WISELY")


def _is_amd() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            return "AuthenticAMD" in f.read(4096)
    except OSError:
        return False


def retain_freed_memory() -> bool:
    """Ask glibc to serve large blocks from the heap and not to trim it (mallopt), so freed tensors' pages are
    reused instead of unmapped and faulted in again. Skipped when the user chose an allocator (LD_PRELOAD of
    jemalloc / tcmalloc) or glibc's own MALLOC_*_ variables, and off glibc. True if applied."""
    if not sys.platform.startswith("linux") or os.environ.get("ERNIE5_KEEP_MALLOC") == "1":
        return False
    if "malloc" in os.environ.get("LD_PRELOAD", "") or any(k.startswith("MALLOC_") and k.endswith("_")
                                                          for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # some glibc builds refuse thresholds above 32 MiB (HEAP_MAX_SIZE / 2); 2.36 here takes 1 GiB
    if not libc.mallopt(m_mmap_threshold, 1 << 30):
        libc.mallopt(m_mmap_threshold, 32 << 20)
    return bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))


@contextlib.contextmanager
def strided_kernels():
    """Paddle's strided (view) kernels on inside the block, for the few APIs that need them (safetensors'
    paddle backend); `setup` turns them off for speed."""
    import paddle

    before = paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"]
    paddle.set_flags({"FLAGS_use_stride_kernel": True})
    try:
        yield
    finally:
        paddle.set_flags({"FLAGS_use_stride_kernel": before})


def setup() -> None:
    """Thread / MKL / allocator settings (the user's own environment wins), then import paddle quietly."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(cores))
    if _is_amd():
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    os.environ.setdefault("GLOG_minloglevel", "2")  # paddle's C++ INFO/WARNING chatter
    # transpose / slice as real copies, not strided views: a later reshape or elementwise op on a strided view
    # goes through a generic strided copy ~30x slower than the transpose kernel (3.1 ms vs 0.1 ms for a
    # [4, 256, 4, 64] head transpose on 2 cores)
    os.environ.setdefault("FLAGS_use_stride_kernel", "0")
    global MALLOC_RETAINED
    MALLOC_RETAINED = retain_freed_memory()
    if "paddle" in sys.modules:
        return
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No ccache found")
        import paddle  # noqa: F401
    for line in captured.getvalue().splitlines():
        if not line.startswith(_BANNER):
            print(line, file=sys.stderr)
