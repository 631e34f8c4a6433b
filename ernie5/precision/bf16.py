"""bf16 GEMMs emulated on CPU (Paddle's CPU build has no bf16 GEMM): round the operands to bf16, multiply and
accumulate in fp32, round the output to bf16.

r(v) = v cast to bf16 and back: round to nearest, ties to even, on the fp32 bit pattern (the low 16 bits of the
significand dropped; inf / NaN kept, subnormals kept), exactly what a real bf16 cast does. bf16 keeps 8
significant bits, so |r(v) - v| <= u |v| with unit roundoff u = 2^-8.

bf16_linear(x, w), x [..., K], w [K, N] (Paddle layout; `transpose_w`: w is [N, K] and the GEMM uses w^T):

    forward    y  = r( r(x) @ r(w) )          bf16 operands, fp32 accumulation, bf16 output (activations are bf16)
    backward   dx = r( r(dy) @ r(w)^T )       the activation gradient is bf16 too
               dw = r(x)^T @ r(dy)            fp32: the master weight's gradient (AMP O2 `master_grad`);
                                              r(r(x)^T @ r(dy)) with fp32_wgrad=False (O2's bf16 weight gradient)

A product of two bf16 values has at most 16 significant bits, so every product is exact in fp32 and only the fp32
sums round: the same arithmetic as a tensor-core bf16 GEMM up to summation order. The result tensors are fp32
holding bf16 values; the parameter itself stays fp32 (it is the master weight). Saved for backward: r(x) and
r(w) as bf16 tensors (2 bytes a value, as a real bf16 GEMM keeps its input).
"""

from __future__ import annotations

import sys

import paddle
from paddle.autograd import PyLayer

_NOTICE_SHOWN = False


def notice_once(enabled: bool) -> None:
    """Say once per process that bf16 is emulated on this CPU build (no setting is silently ignored)."""
    global _NOTICE_SHOWN
    if enabled and not _NOTICE_SHOWN and not paddle.is_compiled_with_cuda():
        _NOTICE_SHOWN = True
        print("note: precision.dtype=bf16: bf16 GEMMs are emulated on CPU (operands and outputs rounded to bf16, "
              "fp32 accumulation, fp32 master weights); numerics follow bf16, speed and memory of bf16 kernels do "
              "not", file=sys.stderr)


def to_bf16(x: paddle.Tensor) -> paddle.Tensor:
    """x as a bf16 tensor (round to nearest even)."""
    return x.astype(paddle.bfloat16)


def round_bf16(x: paddle.Tensor) -> paddle.Tensor:
    """r(x): x rounded to bf16, as fp32 (a gradient through it is rounded to bf16 too)."""
    return x.astype(paddle.bfloat16).astype(x.dtype)


def _flat(x):
    return x.reshape([-1, x.shape[-1]])


class _BF16Matmul(PyLayer):
    @staticmethod
    def forward(ctx, x, w, transpose_w, fp32_wgrad):
        xb, wb = to_bf16(_flat(x)), to_bf16(w)
        ctx.save_for_backward(xb, wb)
        ctx.in_shape, ctx.transpose_w, ctx.fp32_wgrad = x.shape, transpose_w, fp32_wgrad
        y = paddle.matmul(xb.astype("float32"), wb.astype("float32"), transpose_y=transpose_w)
        return round_bf16(y).reshape(list(x.shape[:-1]) + [y.shape[-1]])

    @staticmethod
    def backward(ctx, dy):
        xb, wb = ctx.saved_tensor()
        x2, w, dy2 = xb.astype("float32"), wb.astype("float32"), round_bf16(_flat(dy))
        dx = round_bf16(paddle.matmul(dy2, w, transpose_y=not ctx.transpose_w)).reshape(ctx.in_shape)
        dw = paddle.matmul(dy2, x2, transpose_x=True) if ctx.transpose_w else paddle.matmul(x2, dy2, transpose_x=True)
        return dx, (dw if ctx.fp32_wgrad else round_bf16(dw))


def bf16_linear(x: paddle.Tensor, w: paddle.Tensor, transpose_w: bool = False,
                fp32_wgrad: bool = True) -> paddle.Tensor:
    """x [..., K] @ w [K, N] (w^T for `transpose_w`, w [N, K]) as an emulated bf16 GEMM (differentiable in x and
    w; see the module docstring)."""
    return _BF16Matmul.apply(x, w, transpose_w, fp32_wgrad)
