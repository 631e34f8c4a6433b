"""Differentiable variable-size all-to-all over a process group.

`all_to_all(x, send_splits, recv_splits, group)`: rank i sends rows [sum(send[:j]), +send[j]) of x to rank j
and receives recv[j] rows from each rank j, concatenated in rank order. Backward is the reverse exchange.
On NCCL the native `alltoall_single` is used. Paddle's Gloo backend has no all-to-all, so there it is
built from one all_gather of the padded send buffers plus slicing: it moves `group size` times the data, which
is fine for CPU tests and small runs, and is exact.
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.autograd import PyLayer


def _gloo_exchange(x_NH: paddle.Tensor, send: list[int], recv: list[int], group, all_send: np.ndarray,
                   me: int) -> paddle.Tensor:
    """all_gather every rank's padded send buffer; keep the rows addressed to this rank."""
    width = x_NH.shape[1]
    longest = int(all_send.sum(1).max())
    pad = longest - x_NH.shape[0]
    buf = paddle.concat([x_NH, paddle.zeros([pad, width], dtype=x_NH.dtype)]) if pad else x_NH
    gathered: list[paddle.Tensor] = []
    dist.all_gather(gathered, buf, group=group)
    pieces = []
    for src, rows in enumerate(gathered):
        start = int(all_send[src, :me].sum())
        n = int(all_send[src, me])
        if n:
            pieces.append(rows[start:start + n])
    if not pieces:
        return paddle.zeros([0, width], dtype=x_NH.dtype)
    return paddle.concat(pieces) if len(pieces) > 1 else pieces[0]


def _exchange(x_NH, send, recv, group, all_send, me, native):
    if native:
        out = paddle.empty([int(sum(recv)), x_NH.shape[1]], dtype=x_NH.dtype)
        dist.alltoall_single(out, x_NH, in_split_sizes=list(send), out_split_sizes=list(recv), group=group)
        return out
    return _gloo_exchange(x_NH, send, recv, group, all_send, me)


class _AllToAll(PyLayer):
    @staticmethod
    def forward(ctx, x_NH, send, recv, group, all_send, me, native):
        ctx.args = (send, recv, group, all_send, me, native)
        return _exchange(x_NH, send, recv, group, all_send, me, native)

    @staticmethod
    def backward(ctx, dy):
        send, recv, group, all_send, me, native = ctx.args
        # reverse direction: what we received goes back to its sender; the send matrix transposes
        return _exchange(dy.contiguous() if hasattr(dy, "contiguous") else dy, recv, send, group,
                         np.ascontiguousarray(all_send.T), me, native)


def all_to_all(x_NH: paddle.Tensor, send_matrix: np.ndarray, group, me: int, native: bool) -> paddle.Tensor:
    """Exchange rows; `send_matrix[i, j]` = rows rank i sends to rank j (known on every rank)."""
    send = [int(v) for v in send_matrix[me]]
    recv = [int(v) for v in send_matrix[:, me]]
    return _AllToAll.apply(x_NH, send, recv, group, send_matrix, me, native)
