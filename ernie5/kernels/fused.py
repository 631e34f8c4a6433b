"""Autograd wrappers of the fused CPU kernels (`cpu_fused.cc`). Callers check `ernie5.kernels.usable(...)` first
and otherwise run the plain-Paddle definition each of these is tested against."""

from __future__ import annotations

import paddle
from paddle.autograd import PyLayer

from ernie5.kernels import ops
from ernie5.constants import IGNORE  # the label of positions without a target


def _c(t: paddle.Tensor) -> paddle.Tensor:
    """The kernels index memory directly: hand them contiguous tensors."""
    return t if t.is_contiguous() else t.contiguous()


def record_needs(ctx, *tensors) -> None:
    """Record which inputs want a gradient: Paddle rejects a gradient returned for an input that stops it
    (a frozen weight, or `paddle.grad` over a subset), so the backward returns None for those."""
    ctx.needs = [not t.stop_gradient for t in tensors]


def needed_grads(ctx, *grads):
    return tuple(g if need else None for g, need in zip(grads, ctx.needs))


class RMSNormFused(PyLayer):
    """x / rms(x) * w over the last axis; saves x, w and the per-row 1/rms for the backward."""

    @staticmethod
    def forward(ctx, x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
        x = _c(x)
        y, r = ops().e5_rms_norm(x, weight, float(eps))
        ctx.save_for_backward(x, weight, r)
        record_needs(ctx, x, weight)
        return y

    @staticmethod
    def backward(ctx, g: paddle.Tensor):
        x, weight, r = ctx.saved_tensor()
        g_x, g_w = ops().e5_rms_norm_bwd(_c(g), x, weight, r)
        return needed_grads(ctx, g_x, g_w)


class SwiGLUFused(PyLayer):
    """silu(gate) * up of a [..., 2F] gate|up tensor (columns :F gate, F: up) -> [..., F]."""

    @staticmethod
    def forward(ctx, gate_up: paddle.Tensor) -> paddle.Tensor:
        gate_up = _c(gate_up)
        ctx.save_for_backward(gate_up)
        return ops().e5_swiglu(gate_up)

    @staticmethod
    def backward(ctx, g: paddle.Tensor):
        (gate_up,) = ctx.saved_tensor()
        return ops().e5_swiglu_bwd(gate_up, _c(g))


class RopeFused(PyLayer):
    """x * cos + swap_pairs(x) * signed_sin for x [B, S, N, D] and tables [B or 1, S, 1, D]; the tables are
    constants (no gradient)."""

    @staticmethod
    def forward(ctx, x: paddle.Tensor, cos: paddle.Tensor, ssin: paddle.Tensor) -> paddle.Tensor:
        cos, ssin = _c(cos), _c(ssin)
        ctx.save_for_backward(cos, ssin)
        return ops().e5_rope(_c(x), cos, ssin, False)

    @staticmethod
    def backward(ctx, g: paddle.Tensor):
        cos, ssin = ctx.saved_tensor()
        return ops().e5_rope(_c(g), cos, ssin, True), None, None


class MaskedSoftmax(PyLayer):
    """softmax(scores + mask) over the last axis; scores [B, M, S, Sk], additive mask [B or 1, 1, S, Sk] read in
    place for all M heads (no tiled copy). A row with every key masked gives zeros."""

    @staticmethod
    def forward(ctx, scores: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        probs = ops().e5_masked_softmax(_c(scores), _c(mask))
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, g: paddle.Tensor):
        (probs,) = ctx.saved_tensor()
        return ops().e5_softmax_bwd(probs, _c(g)), None


class Combine(PyLayer):
    """MoE combine: out[t] = sum_k w[t, k] * y_sorted[inv[t K + k]] for expert outputs y_sorted [N, H] in expert
    order, inv [N] the row of each (token, slot) pair (a permutation), weights w [T, K]. One pass instead of a
    gather, a broadcast multiply and a sum (and their three backward ops)."""

    @staticmethod
    def forward(ctx, y_sorted_NH: paddle.Tensor, inv_N: paddle.Tensor, w_TK: paddle.Tensor) -> paddle.Tensor:
        y_sorted_NH, w_TK = _c(y_sorted_NH), _c(w_TK)
        ctx.save_for_backward(y_sorted_NH, inv_N, w_TK)
        record_needs(ctx, y_sorted_NH, w_TK)
        return ops().e5_combine(y_sorted_NH, inv_N, w_TK)

    @staticmethod
    def backward(ctx, g_TH: paddle.Tensor):
        y_sorted_NH, inv_N, w_TK = ctx.saved_tensor()
        dy, dw = ops().e5_combine_bwd(_c(g_TH), y_sorted_NH, inv_N, w_TK)
        dy, dw = needed_grads(ctx, dy, dw)
        return dy, None, dw


class HeadCE(PyLayer):
    """Per-row cross-entropy [N] of the output head: logits = h @ W (W [H, V]) or h @ W^T (W [V, H], a tied
    embedding), 0 on rows labelled IGNORE.

    One [N, V] buffer: the forward's kernel turns the logits into their gradient softmax - onehot in place, and
    the backward folds the per-row upstream gradient g into the two small GEMM operands instead of scaling the
    [N, V] buffer: dW = (g h)^T dlogits, dh = g (dlogits W^T)."""

    @staticmethod
    def forward(ctx, h_NH: paddle.Tensor, w: paddle.Tensor, labels_N: paddle.Tensor, w_is_VH: bool) -> paddle.Tensor:
        logits_NV = paddle.matmul(h_NH, w, transpose_y=w_is_VH)
        _, loss_N = ops().e5_softmax_ce_inplace(logits_NV, _c(labels_N), IGNORE)
        ctx.save_for_backward(h_NH, w, logits_NV)  # logits_NV now holds d loss_n / d logits_n
        ctx.w_is_VH = w_is_VH
        record_needs(ctx, h_NH, w)
        return loss_N

    @staticmethod
    def backward(ctx, g_N: paddle.Tensor):
        h_NH, w, dlogits_NV = ctx.saved_tensor()
        g_N1 = g_N.reshape([-1, 1])
        need_h, need_w = ctx.needs
        dh_NH = paddle.matmul(dlogits_NV, w, transpose_y=not ctx.w_is_VH) * g_N1 if need_h else None
        dw = None
        if need_w:
            gh_NH = h_NH * g_N1
            if ctx.w_is_VH:
                dw = paddle.matmul(dlogits_NV, gh_NH, transpose_x=True)  # [V, H]
            else:
                dw = paddle.matmul(gh_NH, dlogits_NV, transpose_x=True)  # [H, V]
        return dh_NH, dw, None
