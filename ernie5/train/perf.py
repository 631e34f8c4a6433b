"""Hardware peak as measured in this process: the denominator of MFU on CPU."""

from __future__ import annotations

import time

import paddle


def measure_gemm_gflops(n: int = 1024, seconds: float = 0.5) -> float:
    """Sustained fp32 GEMM rate (GFLOP/s) of an n x n x n matmul with the current thread settings."""
    a = paddle.randn([n, n], dtype="float32")
    b = paddle.randn([n, n], dtype="float32")
    for _ in range(3):
        c = paddle.matmul(a, b)
    c.numpy()
    reps, start = 0, time.perf_counter()
    while True:
        c = paddle.matmul(a, b)
        reps += 1
        if reps % 4 == 0:
            c.numpy()  # sync (no-op on CPU, needed on GPU)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2.0 * n ** 3 * reps / elapsed / 1e9
