"""Small building blocks: RMSNorm, bias-free linear with ERNIE init, SwiGLU FFN."""

from __future__ import annotations

from typing import Optional

import numpy as np

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from ernie5 import kernels
from ernie5.kernels.fused import RMSNormFused, SwiGLUFused, needed_grads, record_needs
from ernie5.precision.bf16 import bf16_linear
from ernie5.precision.fp8_linear import fp8_linear


def checkpointed(fn, *args):
    """fn(*args) without keeping its activations: backward re-runs it (Paddle's recompute).

    Paddle runs the first pass under no_grad and the replay with grad enabled; code with side effects (MoE load
    counting) therefore acts only when grad is enabled, so each micro-batch counts once either way.
    """
    from paddle.distributed.fleet.utils import recompute

    return recompute(fn, *args)


class Linear(nn.Linear):
    """Bias-free linear; `fp8` (set by `model.transformer.enable_fp8`) runs it under the blockwise FP8 recipe,
    `bf16` (the PrecisionConfig, set by `model.mixed_precision.enable_bf16` on CPU) as an emulated bf16 GEMM;
    FP8 wins when both are set."""

    fp8 = None
    bf16 = None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.fp8 is not None:
            return fp8_linear(x, self.weight, self.fp8)
        if self.bf16 is not None:
            return bf16_linear(x, self.weight, fp32_wgrad=self.bf16.grad_allreduce_fp32)
        return super().forward(x)


class KeyedNormal(nn.initializer.Initializer):
    """N(0, std) from a NumPy stream keyed by `key`: the same values whatever else was built before (and, being an
    Initializer, deferred like any other under paddle.LazyGuard)."""

    def __init__(self, std: float, key: list[int]):
        super().__init__()
        self.std, self.key = std, key

    def forward(self, var, block=None):
        value = (np.random.default_rng(self.key).standard_normal(var.shape) * self.std).astype(np.float32)
        return nn.initializer.Assign(value)(var, block)


def linear(in_features: int, out_features: int, std: float, init: Optional[nn.initializer.Initializer] = None
           ) -> Linear:
    """Bias-free Linear (weight [in, out], Paddle layout) with N(0, std) init, or `init` when given."""
    attr = paddle.ParamAttr(initializer=init or nn.initializer.Normal(0.0, std))
    return Linear(in_features, out_features, weight_attr=attr, bias_attr=False)


def rms_norm_reference(x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    """x / rms(x) * weight by plain autograd (the definition `RMSNormFunction` is tested against)."""
    return x * paddle.rsqrt(paddle.square(x).mean(-1, keepdim=True) + eps) * weight


class RMSNormFunction(PyLayer):
    """RMSNorm with a hand-written backward: gw = sum_rows(g * xhat) as one GEMV, gx = r * (g w - xhat *
    mean(g w xhat)), r = rsqrt(mean(x^2) + eps). Autograd's version reduces the weight gradient through Paddle's
    broadcast-multiply backward, which on CPU cost more than the rest of the norm (4.3 ms -> ~2.8 ms forward +
    backward at [4, 256, 256])."""

    @staticmethod
    def forward(ctx, x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
        # paddle.square, not pow(2): the generic pow kernel is several times slower on CPU
        r = paddle.rsqrt(paddle.square(x).mean(-1, keepdim=True) + eps)
        xhat = x * r
        ctx.save_for_backward(xhat, r, weight)
        record_needs(ctx, x, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, g: paddle.Tensor):
        xhat, r, weight = ctx.saved_tensor()
        H = xhat.shape[-1]
        gxw = g * xhat
        ones_1T = paddle.ones([1, gxw.numel() // H], dtype=gxw.dtype)
        g_weight = paddle.matmul(ones_1T, gxw.reshape([-1, H])).reshape([H])
        g_xhat = g * weight
        g_x = r * (g_xhat - xhat * (g_xhat * xhat).mean(-1, keepdim=True))
        return needed_grads(ctx, g_x, g_weight)


class RMSNorm(nn.Layer):
    """y = x / rms(x) * weight, computed in fp32."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x32 = x if x.dtype == paddle.float32 else x.astype("float32")
        if kernels.usable(x32, self.weight):
            y = RMSNormFused.apply(x32, self.weight, self.eps)
        elif self.weight.dtype == paddle.float32:
            y = RMSNormFunction.apply(x32, self.weight, self.eps)
        else:
            y = rms_norm_reference(x32, self.weight.astype("float32"), self.eps)
        return y if y.dtype == x.dtype else y.astype(x.dtype)


class SwiGLU(nn.Layer):
    """down(silu(gate(x)) * up(x)); gate and up share one [H, 2F] GEMM (columns :F gate, F: up).

    `recompute_gate_up`: the [N, 2F] intermediate is not kept for backward but recomputed (selective recompute).
    """

    def __init__(self, hidden_size: int, ffn_size: int, std: float, recompute_gate_up: bool = False,
                 init_key: Optional[list[int]] = None):
        super().__init__()
        self.ffn_size = ffn_size
        self.recompute_gate_up = recompute_gate_up
        keyed = init_key is not None  # routed experts: init keyed by (seed, layer, global expert id)
        self.gate_up = linear(hidden_size, 2 * ffn_size, std, KeyedNormal(std, init_key + [0]) if keyed else None)
        self.down = linear(ffn_size, hidden_size, std, KeyedNormal(std, init_key + [1]) if keyed else None)

    def activated(self, x: paddle.Tensor) -> paddle.Tensor:
        gate_up = self.gate_up(x)
        if kernels.usable(gate_up):
            return SwiGLUFused.apply(gate_up)
        gate, up = paddle.split(gate_up, 2, axis=-1)
        return F.silu(gate) * up

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = checkpointed(self.activated, x) if self.recompute_gate_up and self.training else self.activated(x)
        return self.down(h)
