"""CPU thread settings, applied before paddle loads (DESIGN.md platform facts), and a quiet paddle import.

`import paddle` pins OMP_NUM_THREADS=1 when it is unset, and MKL picks a slow path on AMD CPUs unless
MKL_DEBUG_CPU_TYPE=5; either alone costs ~5x in fp32 GEMM on 2 cores. The user's own settings always win.
With more than one thread paddle prints a two-line OMP banner on stderr at import; it is dropped (only those
lines) so that a user error stays one line.
"""

import contextlib
import io
import os
import sys
import warnings

_BANNER = ("WARNING: OMP_NUM_THREADS set to", "PLEASE USE OMP_NUM_THREADS WISELY")


def _is_amd() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            return "AuthenticAMD" in f.read(4096)
    except OSError:
        return False


def configure() -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(cores))
    if _is_amd():
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    os.environ.setdefault("GLOG_minloglevel", "2")  # paddle's C++ INFO/WARNING chatter
    if "paddle" in sys.modules:
        return
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No ccache found")
        import paddle  # noqa: F401
    for line in captured.getvalue().splitlines():
        if not line.startswith(_BANNER):
            print(line, file=sys.stderr)
