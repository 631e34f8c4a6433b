"""FP8 linear layers: y = x @ w with the blockwise E4M3 recipe in forward and backward (the
DeepSeek-V3 / ERNIE 4.5 recipe of `ernie5.precision.fp8`).

forward:  y  = Q_tile(x) @ Q_block(w)
backward: dx = Q_tile(dy) @ Q_block(w)^T            (tiles along the output features)
          dw = Q_tile(x^T) @ Q_tile(dy^T)^T         (tiles along the tokens, the contraction dim of wgrad)
Q_tile / Q_block round through E4M3 with power-of-two scales (ernie5.precision.fp8); products accumulate in
fp32. With `store_activations` the input saved for backward is kept as E4M3 bytes + scales (1 byte per value
instead of 4) and dequantised in backward.

Where it runs: every build uses this emulation (quantise -> dequantise -> GEMM). Native FP8 GEMM kernels are
not wired in: no Paddle blockwise FP8 GEMM API was verified on a GPU here, so none is called.
"""

from __future__ import annotations

import sys

import paddle
from paddle.autograd import PyLayer

from ernie5.precision.config import FP8Config
from ernie5.precision.fp8 import dequantize_tiles, fake_quant_blocks, fake_quant_tiles, quantize_tiles

_NOTICE_SHOWN = False


def notice_once(enabled: bool) -> None:
    """Say once per process that FP8 GEMMs are emulated (no setting is silently ignored)."""
    global _NOTICE_SHOWN
    if enabled and not _NOTICE_SHOWN:
        _NOTICE_SHOWN = True
        print("note: precision.fp8: FP8 GEMMs are emulated (E4M3 quantise -> dequantise -> fp32 GEMM); numerics "
              "follow the recipe, speed and memory of real FP8 kernels do not", file=sys.stderr)


def _flat(x):
    return x.reshape([-1, x.shape[-1]])


class _FP8Matmul(PyLayer):
    @staticmethod
    def forward(ctx, x, w, tile, block, store_fp8):
        wq = fake_quant_blocks(w, block)
        x2 = _flat(x)
        ctx.tile, ctx.in_shape, ctx.store_fp8 = tile, x.shape, store_fp8
        if store_fp8:
            q, scale = quantize_tiles(x2, tile)  # E4M3 bytes
            ctx.save_for_backward(q, scale, wq)
            xq = dequantize_tiles(q, scale, tile)
        else:
            xq = fake_quant_tiles(x2, tile)
            ctx.save_for_backward(x2, wq)
        return paddle.matmul(xq, wq).reshape(list(x.shape[:-1]) + [w.shape[1]])

    @staticmethod
    def backward(ctx, dy):
        tile = ctx.tile
        if ctx.store_fp8:
            q, scale, wq = ctx.saved_tensor()
            x2 = dequantize_tiles(q, scale, tile)
        else:
            x2, wq = ctx.saved_tensor()
        dy2 = _flat(dy)
        dx = paddle.matmul(fake_quant_tiles(dy2, tile), wq, transpose_y=True).reshape(ctx.in_shape)
        dw = paddle.matmul(fake_quant_tiles(x2.T, tile), fake_quant_tiles(dy2.T, tile), transpose_y=True)
        return dx, dw


def fp8_linear(x: paddle.Tensor, w: paddle.Tensor, cfg: FP8Config) -> paddle.Tensor:
    """x [..., K] @ w [K, N] under the FP8 recipe (differentiable in x and w)."""
    return _FP8Matmul.apply(x, w, cfg.tile, cfg.block, cfg.store_activations)


def quantize_for_dispatch(x_TH: paddle.Tensor, cfg: FP8Config) -> paddle.Tensor:
    """Tokens rounded through E4M3 before the expert all-to-all (straight-through gradient)."""
    return x_TH + (fake_quant_tiles(x_TH, cfg.tile) - x_TH).detach()
