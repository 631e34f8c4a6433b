"""Token dispatchers: move routed tokens to their experts and the results back.

The MoE layer is given a dispatcher object, so expert parallelism can replace the local one without touching
the layer. `LocalDispatcher` is sort-based: the T*K (token, slot) pairs are sorted by expert id so each expert
reads one contiguous slice (one GEMM per expert, no per-expert mask over all tokens); results are put back in
(token, slot) order with one gather by the inverse permutation and summed with the combine weights.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import paddle

from ernie5 import kernels
from ernie5.kernels.fused import Combine

ExpertFn = Callable[[int, paddle.Tensor], paddle.Tensor]


def sort_by_expert(x_TH: paddle.Tensor, topk_ids_TK: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """(order_N, x_sorted_NH): the N = T*K (token, slot) pairs ordered by expert id, and their token rows."""
    K = topk_ids_TK.shape[1]
    order_N = paddle.argsort(topk_ids_TK.flatten(), stable=True)
    return order_N, paddle.gather(x_TH, order_N // K)


def unsort_and_combine(y_sorted_NH: paddle.Tensor, order_N: paddle.Tensor, topk_w_TK: paddle.Tensor) -> paddle.Tensor:
    """Back to (token, slot) order with one gather by the inverse permutation, then the weighted sum over slots."""
    T, K = topk_w_TK.shape
    if kernels.usable(y_sorted_NH, topk_w_TK):
        return Combine.apply(y_sorted_NH, paddle.argsort(order_N), topk_w_TK)
    y_TKH = paddle.gather(y_sorted_NH, paddle.argsort(order_N)).reshape([T, K, -1])
    return (y_TKH * topk_w_TK.astype(y_TKH.dtype).unsqueeze(-1)).sum(axis=1)


class LocalDispatcher:
    """All experts live in this process."""

    def __call__(self, x_TH: paddle.Tensor, topk_ids_TK: paddle.Tensor, topk_w_TK: paddle.Tensor,
                 counts_E: Sequence[int], expert_fn: ExpertFn) -> paddle.Tensor:
        order_N, x_sorted_NH = sort_by_expert(x_TH, topk_ids_TK)
        used = [(e, n) for e, n in enumerate(np.asarray(counts_E).tolist()) if n]
        # one split, not a slice per expert: a slice's backward zero-fills a whole [N, H] gradient per expert
        # (64 experts: 64 full-size fills per layer); the split's backward is one concat
        parts = paddle.split(x_sorted_NH, [n for _, n in used]) if len(used) > 1 else [x_sorted_NH]
        outputs = [expert_fn(e, xs) for (e, _), xs in zip(used, parts)]
        y_sorted_NH = paddle.concat(outputs, axis=0) if len(outputs) > 1 else outputs[0]
        return unsort_and_combine(y_sorted_NH, order_N, topk_w_TK)
