"""Hardware peak as measured in this process: the denominator of MFU on CPU (the trainer's metric and bench)."""

from __future__ import annotations

import time

import paddle


def gemm_gflops(m: int, k: int, n: int, seconds: float = 0.5) -> float:
    """Sustained fp32 rate (GFLOP/s) of an [m,k] x [k,n] matmul with the current thread settings."""
    a_MK = paddle.randn([m, k], dtype="float32")
    b_KN = paddle.randn([k, n], dtype="float32")
    for _ in range(3):  # allocation, MKL setup, warm caches
        c_MN = paddle.matmul(a_MK, b_KN)
    c_MN.numpy()
    reps, start = 0, time.perf_counter()
    while True:
        c_MN = paddle.matmul(a_MK, b_KN)
        reps += 1
        if reps % 4 == 0:
            c_MN.numpy()  # sync (no-op on CPU, needed on GPU)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2.0 * m * k * n * reps / elapsed / 1e9


def measure_gemm_gflops(n: int = 1024, seconds: float = 0.5, trials: int = 3) -> float:
    """The square n x n x n case of `gemm_gflops`: the best of `trials` probes sharing `seconds`. A probe that a
    busy neighbour on a shared host slows down would otherwise lower the MFU denominator for the whole run (one
    fresh-clone demo measured half the usual peak once and reported an MFU of 1.44)."""
    return max(gemm_gflops(n, n, n, seconds / trials) for _ in range(trials))
