"""Small building blocks: RMSNorm, bias-free linear with ERNIE init, SwiGLU FFN."""

from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F


def linear(in_features: int, out_features: int, std: float) -> nn.Linear:
    """Bias-free Linear (weight [in, out], Paddle layout) with N(0, std) init."""
    attr = paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, std))
    return nn.Linear(in_features, out_features, weight_attr=attr, bias_attr=False)


class RMSNorm(nn.Layer):
    """y = x / rms(x) * weight, computed in fp32."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x32 = x.astype("float32")
        y = x32 * paddle.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).astype(x.dtype)


class SwiGLU(nn.Layer):
    """down(silu(gate(x)) * up(x)); gate and up share one [H, 2F] GEMM (columns :F gate, F: up)."""

    def __init__(self, hidden_size: int, ffn_size: int, std: float):
        super().__init__()
        self.ffn_size = ffn_size
        self.gate_up = linear(hidden_size, 2 * ffn_size, std)
        self.down = linear(ffn_size, hidden_size, std)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        gate, up = paddle.split(self.gate_up(x), 2, axis=-1)
        return self.down(F.silu(gate) * up)
