"""Convolutions whose bias is added as a same-shape add.

Paddle's conv ops add their bias by broadcasting [1, C, 1, ...] over the output, and its CPU broadcast-add
kernels are slow: on a [32, 32, 16, 16] output the bias took as long as the 3x3 convolution itself (forward +
backward 5.1 ms; expanded to the output's shape first, 1.0 ms). The sums are the same, so the forward output is
bit-identical; only the bias gradient's reduction may be summed in another order. Parameters keep the names and
shapes of Paddle's layers (`weight`, `bias`), so checkpoints load either way.
"""

from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F


def add_channel_bias(y_BC_: paddle.Tensor, bias_C) -> paddle.Tensor:
    """y + bias over axis 1 (bias None: y)."""
    if bias_C is None:
        return y_BC_
    return y_BC_ + bias_C.reshape([1, -1] + [1] * (y_BC_.ndim - 2)).expand(y_BC_.shape)


class Conv1D(nn.Conv1D):
    """`paddle.nn.Conv1D` (NCL, zero padding) with the bias added by `add_channel_bias`."""

    def forward(self, x_BCL: paddle.Tensor) -> paddle.Tensor:
        if self._padding_mode != "zeros" or self._data_format != "NCL":
            return super().forward(x_BCL)
        y = F.conv1d(x_BCL, self.weight, None, stride=self._stride, padding=self._padding,
                     dilation=self._dilation, groups=self._groups)
        return add_channel_bias(y, self.bias)
