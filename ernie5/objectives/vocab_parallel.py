"""Cross-entropy of a vocabulary-parallel text head (Megatron's vocab-parallel CE, written for this codebase).

Each tensor-parallel rank holds the head rows of a contiguous vocabulary slice [v0, v0 + V_r) and computes only
those logits, l_r = h W_r^T. For a row with target y, the loss over the whole vocabulary is

    loss = logsumexp_all(l) - l_y,    logsumexp_all = M + log sum_r exp(lse_r - M),   M = max_r lse_r,

where lse_r = logsumexp over rank r's slice: one max and two sums of an [N] vector over the group, never the
[N, V] logits. The gradient of the logits on rank r is softmax_all - onehot(y) restricted to the slice:
p_r * exp(lse_r - logsumexp_all) - onehot, with p_r the slice's own softmax.

On CPU the slice's softmax and CE come from the fused kernel (`e5_softmax_ce_inplace`, the one the one-process
head uses): it is given, for rows whose target lies on another rank, column 0 as a stand-in target, which yields
lse_r = loss_r + l_0 and a buffer p_r - onehot(0) that is corrected in place. Elsewhere Paddle's
softmax_with_cross_entropy does the same job. The head input enters through `copy_to` (identity forward,
all-reduce backward): each rank's gradient of h covers only its slice.
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from ernie5 import kernels
from ernie5.comm.regions import TPGroup, all_reduce_max, all_reduce_sum, copy_to
from ernie5.constants import IGNORE
from ernie5.precision.bf16 import round_bf16


def _slice_softmax_ce_(logits_NV: paddle.Tensor, target_N: np.ndarray, fused: bool):
    """(buffer, loss): `logits_NV` overwritten by softmax - onehot(target) per row (0 on IGNORE rows) and the
    slice's CE loss (0 on IGNORE rows)."""
    labels = paddle.to_tensor(target_N, dtype="int64")
    if fused:
        return kernels.ops().e5_softmax_ce_inplace(logits_NV, labels, IGNORE)
    loss, sm = F.softmax_with_cross_entropy(logits_NV, labels.reshape([-1, 1]), ignore_index=IGNORE,
                                            return_softmax=True)
    keep = np.flatnonzero(target_N != IGNORE)
    if keep.size:
        rows = paddle.to_tensor(keep)
        paddle.index_put_(sm, (rows, paddle.to_tensor(target_N[keep])), paddle.full([keep.size], -1.0, sm.dtype),
                          accumulate=True)
    if keep.size < target_N.size:
        sm = sm * paddle.to_tensor((target_N != IGNORE).astype(np.float32))[:, None]
    return sm, loss.reshape([-1])


class VocabParallelHeadCE(PyLayer):
    """apply(h [N, H], W_r, labels [N], w_is_VH, tp, vocab_start, fused) -> per-row CE [N] over the whole
    vocabulary (0 where the label is IGNORE); the same value on every rank of the group."""

    @staticmethod
    def forward(ctx, h_NH, w, labels_N, w_is_VH: bool, tp: TPGroup, vocab_start: int, fused: bool):
        logits_NV = paddle.matmul(h_NH, w, transpose_y=w_is_VH)
        N, V_r = logits_NV.shape
        lab = labels_N.numpy().reshape(-1)
        keep = lab != IGNORE
        local = lab - vocab_start
        inside = keep & (local >= 0) & (local < V_r)
        target = np.where(keep, np.where(inside, local, 0), IGNORE).astype(np.int64)
        col = np.where(keep, target, 0)
        rows_all = paddle.arange(N, dtype="int64")
        x_col_N = paddle.gather_nd(logits_NV, paddle.stack([rows_all, paddle.to_tensor(col)], 1))  # before in place
        buf_NV, loss_r_N = _slice_softmax_ce_(logits_NV, target, fused)
        lse_r_N = loss_r_N + x_col_N
        M_N = all_reduce_max(lse_r_N, tp)
        lse_N = M_N + paddle.log(all_reduce_sum(paddle.exp(lse_r_N - M_N), tp))
        inside_f = paddle.to_tensor(inside.astype(np.float32))
        target_logit_N = all_reduce_sum(x_col_N * inside_f, tp)
        keep_f = paddle.to_tensor(keep.astype(np.float32))
        loss_N = (lse_N - target_logit_N) * keep_f
        # buffer: p_r - onehot(target) -> p_r * exp(lse_r - lse) - onehot(y) where y is on this rank
        kept = np.flatnonzero(keep)
        if kept.size:
            paddle.index_put_(buf_NV, (paddle.to_tensor(kept), paddle.to_tensor(target[kept])),
                              paddle.ones([kept.size], buf_NV.dtype), accumulate=True)
        buf_NV.multiply_((paddle.exp(lse_r_N - lse_N) * keep_f).unsqueeze(-1))
        mine = np.flatnonzero(inside)
        if mine.size:
            paddle.index_put_(buf_NV, (paddle.to_tensor(mine), paddle.to_tensor(local[mine])),
                              paddle.full([mine.size], -1.0, buf_NV.dtype), accumulate=True)
        ctx.save_for_backward(h_NH, w, buf_NV)
        ctx.w_is_VH = w_is_VH
        return loss_N

    @staticmethod
    def backward(ctx, g_N):
        h_NH, w, dlogits_NV = ctx.saved_tensor()
        g_N1 = g_N.reshape([-1, 1])
        dh_NH = paddle.matmul(dlogits_NV, w, transpose_y=not ctx.w_is_VH) * g_N1
        gh_NH = h_NH * g_N1
        dw = (paddle.matmul(dlogits_NV, gh_NH, transpose_x=True) if ctx.w_is_VH
              else paddle.matmul(gh_NH, dlogits_NV, transpose_x=True))
        return dh_NH, dw, None


def vocab_parallel_row_losses(model, normed_NH: paddle.Tensor, labels_N: paddle.Tensor) -> paddle.Tensor:
    """Per-row CE [N] of a tensor-parallel model's text head (rows whose label is IGNORE give 0)."""
    tp = model.tp
    weight, w_is_VH = model.head_weight()
    if weight is None:
        raise ValueError("tensor parallelism needs a plain text head (FP8 on the head is not supported with it)")
    h = copy_to(normed_NH, tp)
    if model.head_bf16 is not None or getattr(model.lm_head, "bf16", None) is not None:
        # emulated bf16 head GEMM (tied or untied): operands rounded (h's gradient too), fp32 weight gradient
        h = round_bf16(h)
        weight = weight + (round_bf16(weight) - weight).detach()
    fused = kernels.usable(h, weight)
    start = model.embed.vocab_start if w_is_VH else model.lm_head.weight.tp_shard.bounds(model.cfg.vocab_size)[0][0]
    return VocabParallelHeadCE.apply(h, weight, labels_N.reshape([-1]).astype("int64"), w_is_VH, tp, start, fused)
