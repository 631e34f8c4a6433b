"""Convolutions with the bias added as a same-shape add (`ernie5.modality.conv`) against Paddle's own layers."""

import numpy as np
import paddle
import pytest

from ernie5.modality.conv import Conv1D, add_channel_bias
from ernie5.modality.vision import CausalConv3d


def test_add_channel_bias_equals_numpy_broadcast():
    y = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    b = np.array([1.5, -2.0, 0.25], np.float32)
    got = add_channel_bias(paddle.to_tensor(y), paddle.to_tensor(b)).numpy()
    np.testing.assert_array_equal(got, y + b[None, :, None, None])  # one float add per element: exact
    np.testing.assert_array_equal(add_channel_bias(paddle.to_tensor(y), None).numpy(), y)


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=2, dilation=2), dict(kernel_size=1),
                                dict(kernel_size=8, stride=4)])
def test_conv1d_equals_paddles_layer(kw):
    paddle.seed(1)
    layer = Conv1D(6, 5, **kw)
    layer.bias.set_value(paddle.randn([5]))
    x = paddle.randn([3, 6, 40])
    x.stop_gradient = False
    ours = layer(x)
    theirs = paddle.nn.Conv1D.forward(layer, x)
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())  # the same products and sums
    g = paddle.randn(ours.shape)
    grads = [paddle.grad(out, [x, layer.weight, layer.bias], g) for out in (ours, theirs)]
    for a, b in zip(*grads):  # the bias gradient's reduction may be summed in another order: fp32 roundoff
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frames", [1, 3])
def test_causal_conv3d_equals_paddles_conv3d_on_padded_frames(frames):
    paddle.seed(2)
    layer = CausalConv3d(4, 6, kt=2, k=3, stride=2)
    layer.conv.bias.set_value(paddle.randn([6]))
    x = paddle.randn([2, 4, frames, 8, 8])
    padded = paddle.concat([x[:, :, :1], x], axis=2)  # one copy of the first frame in front: causal in time
    # the one-frame path sums the temporal taps first (2D conv): fp32 roundoff of O(1) sums over 36 terms
    np.testing.assert_allclose(layer(x).numpy(), layer.conv(padded).numpy(), rtol=1e-5, atol=1e-5)
