"""Blockwise FP8 (E4M3) quantisation, the DeepSeek-V3 / ERNIE 4.5 recipe, as pure functions on paddle tensors.

- Activations and gradients: one scale per 1 x `tile` run of the last dim (`quantize_tiles`).
- Weights [K, N]: one scale per `block` x `block` block (`quantize_blocks`).
- Scales are powers of two, scale = 2^ceil(log2(amax / 448)), so x / scale never exceeds E4M3's largest
  finite value 448 and rescaling is exact (only the cast to E4M3 rounds). All-zero tiles get scale 1.
  Exponents are clamped to fp32's normal range, [-126, 127]; non-finite inputs are not handled (NaN / inf
  propagate), the trainer's NaN guard deals with them.
- Values are cast with `astype("float8_e4m3fn")` (round to nearest even, saturating) and back with
  `astype("float32")`; the quantised tensor keeps the input's shape, the last tile / block of a dimension
  that is not a multiple of the tile is ragged (computed on a zero-padded copy: zeros never raise an amax).

Error of one quantised value (E4M3: 3 mantissa bits, smallest normal 2^-6, subnormal step 2^-9):
|x - dq(q(x))| <= max(2^-4 |x|, 2^-10 scale) -- half an ulp of a normal, or half the subnormal step.

`fp8_gemm` quantises both operands, dequantises and multiplies in fp32: on CPU this is the exact emulation
of a blockwise-scaled FP8 GEMM with fp32 accumulation (products of E4M3 values and power-of-two scales are
exact in fp32; only the summation order differs from a GPU kernel).
"""

from __future__ import annotations

import paddle

E4M3_MAX = 448.0
FP8_DTYPE = "float8_e4m3fn"


def is_native_fp8_available() -> bool:
    """True only on a CUDA build of Paddle that ships the blockwise FP8 GEMM op and runs on a GPU with FP8
    tensor cores (compute capability >= 8.9). This path is not exercised here: tests and CI run the CPU
    build, where this returns False and FP8 GEMMs are emulated with `fp8_gemm`."""
    if not paddle.is_compiled_with_cuda():
        return False
    try:
        import paddle.incubate.nn.functional as IF

        if not hasattr(IF, "fp8_gemm_blockwise"):
            return False
        if paddle.device.cuda.device_count() < 1:
            return False
        major, minor = paddle.device.cuda.get_device_capability()
        return (major, minor) >= (8, 9)
    except (ImportError, RuntimeError, ValueError):
        return False


def pow2_scale(amax: paddle.Tensor) -> paddle.Tensor:
    """Smallest power of two s with amax / s <= 448 (fp32); 1 where amax is 0."""
    amax = amax.astype("float32")
    ratio = amax / E4M3_MAX
    # frexp: ratio = m * 2^e with m in [0.5, 1): ceil(log2(ratio)) = e, or e - 1 when m == 0.5 (exact power)
    mant, expo = paddle.frexp(ratio)
    expo = paddle.where(mant == 0.5, expo - 1, expo)
    expo = paddle.clip(expo, -126.0, 127.0)
    return paddle.where(amax > 0, paddle.pow(paddle.full_like(expo, 2.0), expo), paddle.ones_like(amax))


def _pad_last(x: paddle.Tensor, multiple: int) -> paddle.Tensor:
    pad = (-x.shape[-1]) % multiple
    if pad == 0:
        return x
    return paddle.concat([x, paddle.zeros(list(x.shape[:-1]) + [pad], dtype=x.dtype)], axis=-1)


def quantize_tiles(x: paddle.Tensor, tile: int = 128) -> tuple[paddle.Tensor, paddle.Tensor]:
    """x [..., K] -> (E4M3 values [..., K], fp32 scales [..., ceil(K / tile)]): one scale per 1 x tile."""
    K = x.shape[-1]
    x_pad = _pad_last(x.astype("float32"), tile)
    lead = list(x.shape[:-1])
    tiles = x_pad.reshape(lead + [x_pad.shape[-1] // tile, tile])
    scale = pow2_scale(tiles.abs().max(axis=-1))
    q = (tiles / scale.unsqueeze(-1)).reshape(lead + [x_pad.shape[-1]])[..., :K]
    return q.astype(FP8_DTYPE), scale


def dequantize_tiles(q: paddle.Tensor, scale: paddle.Tensor, tile: int = 128) -> paddle.Tensor:
    """Inverse of `quantize_tiles`: fp32 [..., K]."""
    K = q.shape[-1]
    v = _pad_last(q.astype("float32"), tile)
    lead = list(q.shape[:-1])
    v = v.reshape(lead + [v.shape[-1] // tile, tile]) * scale.unsqueeze(-1)
    return v.reshape(lead + [-1])[..., :K]


def _pad_2d(w: paddle.Tensor, block: int) -> paddle.Tensor:
    K, N = w.shape
    pk, pn = (-K) % block, (-N) % block
    if pk == 0 and pn == 0:
        return w
    w = paddle.concat([w, paddle.zeros([K, pn], dtype=w.dtype)], axis=1) if pn else w
    return paddle.concat([w, paddle.zeros([pk, N + pn], dtype=w.dtype)], axis=0) if pk else w


def quantize_blocks(w: paddle.Tensor, block: int = 128) -> tuple[paddle.Tensor, paddle.Tensor]:
    """w [K, N] -> (E4M3 values [K, N], fp32 scales [ceil(K / block), ceil(N / block)])."""
    K, N = w.shape
    wp = _pad_2d(w.astype("float32"), block)
    kb, nb = wp.shape[0] // block, wp.shape[1] // block
    blocks = wp.reshape([kb, block, nb, block])
    scale = pow2_scale(blocks.abs().max(axis=[1, 3]))
    q = (blocks / scale.reshape([kb, 1, nb, 1])).reshape([kb * block, nb * block])[:K, :N]
    return q.astype(FP8_DTYPE), scale


def dequantize_blocks(q: paddle.Tensor, scale: paddle.Tensor, block: int = 128) -> paddle.Tensor:
    """Inverse of `quantize_blocks`: fp32 [K, N]."""
    K, N = q.shape
    v = _pad_2d(q.astype("float32"), block)
    kb, nb = v.shape[0] // block, v.shape[1] // block
    v = v.reshape([kb, block, nb, block]) * scale.reshape([kb, 1, nb, 1])
    return v.reshape([kb * block, nb * block])[:K, :N]


def fake_quant_tiles(x: paddle.Tensor, tile: int = 128) -> paddle.Tensor:
    """x rounded through E4M3 with per-tile scales (fp32, same shape)."""
    return dequantize_tiles(*quantize_tiles(x, tile), tile)


def fake_quant_blocks(w: paddle.Tensor, block: int = 128) -> paddle.Tensor:
    """w rounded through E4M3 with per-block scales (fp32, same shape)."""
    return dequantize_blocks(*quantize_blocks(w, block), block)


def fp8_gemm(x: paddle.Tensor, w: paddle.Tensor, tile: int = 128, block: int = 128) -> paddle.Tensor:
    """x [..., K] @ w [K, N] with x quantised per 1 x tile and w per block x block, accumulated in fp32."""
    return paddle.matmul(fake_quant_tiles(x, tile), fake_quant_blocks(w, block))
