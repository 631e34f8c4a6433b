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

ExpertFn = Callable[[int, paddle.Tensor], paddle.Tensor]


class LocalDispatcher:
    """All experts live in this process."""

    def __call__(self, x_TH: paddle.Tensor, topk_ids_TK: paddle.Tensor, topk_w_TK: paddle.Tensor,
                 counts_E: Sequence[int], expert_fn: ExpertFn) -> paddle.Tensor:
        T, K = topk_ids_TK.shape
        order_N = paddle.argsort(topk_ids_TK.flatten(), stable=True)  # N = T*K (token, slot) pairs
        x_sorted_NH = paddle.gather(x_TH, order_N // K)
        outputs, start = [], 0
        for e, n in enumerate(np.asarray(counts_E).tolist()):
            if n:
                outputs.append(expert_fn(e, x_sorted_NH[start:start + n]))
                start += n
        y_sorted_NH = paddle.concat(outputs, axis=0) if len(outputs) > 1 else outputs[0]
        y_TKH = paddle.gather(y_sorted_NH, paddle.argsort(order_N)).reshape([T, K, -1])
        return (y_TKH * topk_w_TK.astype(y_TKH.dtype).unsqueeze(-1)).sum(axis=1)
