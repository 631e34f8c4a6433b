"""Blockwise E4M3 quantisation: error bounds per tile / block, power-of-two scales that cover the amax, zero
tiles, ragged shapes, and the emulated FP8 GEMM against fp32."""

import numpy as np
import paddle
import pytest

from ernie5.precision.fp8 import (E4M3_MAX, dequantize_blocks, dequantize_tiles, fake_quant_blocks,
                                  fake_quant_tiles, fp8_gemm, is_native_fp8_available, pow2_scale,
                                  quantize_blocks, quantize_tiles)

U = 2.0 ** -4  # half an ulp of E4M3 (3 mantissa bits), relative
SUB = 2.0 ** -10  # half the subnormal step 2^-9, in units of the tile's scale


def _wide(shape, seed=0):
    """Gaussian values times a per-element magnitude spread over 2^-12 .. 2^12: every tile mixes normal and
    subnormal E4M3 values."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * np.exp2(rng.uniform(-12, 12, shape))).astype(np.float32)


def _is_pow2(s: np.ndarray) -> bool:
    m, _ = np.frexp(s)
    return bool(np.all(m == 0.5))


@pytest.mark.parametrize("shape,tile", [((4, 256), 128), ((3, 300), 128), ((2, 5, 77), 32), ((1, 1), 128)])
def test_tile_error_bound_and_scales(shape, tile):
    x = _wide(shape)
    q, s = quantize_tiles(paddle.to_tensor(x), tile)
    assert q.dtype == paddle.float8_e4m3fn and list(q.shape) == list(shape)
    n_tiles = -(-shape[-1] // tile)
    assert list(s.shape) == list(shape[:-1]) + [n_tiles]
    s_np = s.numpy()
    assert _is_pow2(s_np)
    # the scale covers the tile's amax, and is the smallest power of two that does
    pad = np.zeros(shape[:-1] + (n_tiles * tile - shape[-1],), np.float32)
    amax = np.abs(np.concatenate([x, pad], -1)).reshape(shape[:-1] + (n_tiles, tile)).max(-1)
    assert np.all(s_np * E4M3_MAX >= amax)
    assert np.all(s_np / 2 * E4M3_MAX < amax)
    d = dequantize_tiles(q, s, tile).numpy()
    scale_per_elem = np.repeat(s_np, tile, axis=-1)[..., :shape[-1]]
    err = np.abs(d - x)
    assert np.all(err <= np.maximum(U * np.abs(x), SUB * scale_per_elem))
    normal = np.abs(x) >= 2.0 ** -6 * scale_per_elem  # E4M3 normal range after scaling
    assert np.all(err[normal] <= U * np.abs(x[normal]))


@pytest.mark.parametrize("shape,block", [((256, 384), 128), ((300, 130), 128), ((7, 9), 4)])
def test_block_error_bound_and_scales(shape, block):
    w = _wide(shape, seed=1)
    q, s = quantize_blocks(paddle.to_tensor(w), block)
    kb, nb = -(-shape[0] // block), -(-shape[1] // block)
    assert list(q.shape) == list(shape) and list(s.shape) == [kb, nb]
    s_np = s.numpy()
    assert _is_pow2(s_np)
    padded = np.zeros((kb * block, nb * block), np.float32)
    padded[:shape[0], :shape[1]] = w
    amax = np.abs(padded).reshape(kb, block, nb, block).max((1, 3))
    assert np.all(s_np * E4M3_MAX >= amax) and np.all(s_np / 2 * E4M3_MAX < amax)
    d = dequantize_blocks(q, s, block).numpy()
    scale_per_elem = np.kron(s_np, np.ones((block, block), np.float32))[:shape[0], :shape[1]]
    assert np.all(np.abs(d - w) <= np.maximum(U * np.abs(w), SUB * scale_per_elem))


def test_zero_tiles_and_blocks_are_safe():
    x = np.zeros((2, 256), np.float32)
    x[1, 130] = 3.0  # one non-zero value in the second tile of row 1
    q, s = quantize_tiles(paddle.to_tensor(x), 128)
    assert s.numpy().tolist() == [[1.0, 1.0], [1.0, 2.0 ** -7]]
    np.testing.assert_array_equal(dequantize_tiles(q, s, 128).numpy(), x)
    w = np.zeros((128, 256), np.float32)
    qw, sw = quantize_blocks(paddle.to_tensor(w), 128)
    assert sw.numpy().tolist() == [[1.0, 1.0]]
    assert np.isfinite(dequantize_blocks(qw, sw, 128).numpy()).all()


def test_pow2_scale_edges():
    amax = paddle.to_tensor([0.0, 448.0, 449.0, 896.0, 1.0, 1e-40, 3e38])
    assert pow2_scale(amax).numpy().tolist() == [1.0, 1.0, 2.0, 2.0, 2.0 ** -8, 2.0 ** -126, 2.0 ** 120]


def test_exactly_representable_values_survive():
    # E4M3 grid values times a power-of-two scale round-trip exactly
    grid = np.array([448, 240, 1.125, 1, 0.5, 2.0 ** -6, 2.0 ** -9, 0, -3.5, -448], np.float32) * 2.0 ** 5
    np.testing.assert_array_equal(fake_quant_tiles(paddle.to_tensor(grid[None]), 16).numpy()[0], grid)


def test_fake_quant_is_idempotent():
    x = paddle.to_tensor(_wide((4, 200), seed=3))
    once = fake_quant_tiles(x, 128)
    np.testing.assert_array_equal(fake_quant_tiles(once, 128).numpy(), once.numpy())
    w = paddle.to_tensor(_wide((130, 140), seed=4))
    once = fake_quant_blocks(w, 128)
    np.testing.assert_array_equal(fake_quant_blocks(once, 128).numpy(), once.numpy())


@pytest.mark.parametrize("M,K,N", [(64, 256, 128), (37, 300, 130)])
def test_fp8_gemm_close_to_fp32(M, K, N):
    """Bound: each product x_k w_k is off by at most ex_k |w_k| + |x_k| ew_k + ex_k ew_k, with
    ex = max(2^-4 |x|, 2^-10 scale_x) (ew likewise), summed over k; plus fp32 summation slack.
    For Gaussian operands the relative Frobenius error is also < 4%."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    y = fp8_gemm(paddle.to_tensor(x), paddle.to_tensor(w), 128, 128).numpy()
    ref = x.astype(np.float64) @ w.astype(np.float64)
    _, sx = quantize_tiles(paddle.to_tensor(x), 128)
    _, sw = quantize_blocks(paddle.to_tensor(w), 128)
    ex = np.maximum(U * np.abs(x), SUB * np.repeat(sx.numpy(), 128, axis=-1)[:, :K])
    ew = np.maximum(U * np.abs(w), SUB * np.kron(sw.numpy(), np.ones((128, 128)))[:K, :N])
    bound = ex @ np.abs(w) + np.abs(x) @ ew + ex @ ew + 1e-5 * (np.abs(x) @ np.abs(w))
    assert np.all(np.abs(y - ref) <= bound)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.04


def test_fp8_gemm_batched_input():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    y = fp8_gemm(paddle.to_tensor(x), paddle.to_tensor(w), 32, 32).numpy()
    flat = fp8_gemm(paddle.to_tensor(x.reshape(6, 64)), paddle.to_tensor(w), 32, 32).numpy()
    np.testing.assert_allclose(y.reshape(6, 16), flat, rtol=1e-6, atol=1e-6)


def test_native_fp8_not_available_on_cpu_build():
    if paddle.is_compiled_with_cuda():
        pytest.skip("CUDA build: the probe depends on the GPU")
    assert is_native_fp8_available() is False
