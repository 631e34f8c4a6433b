"""Expert-parallel dispatcher: experts sharded over the `ep` ranks of an expert-parallel group.

Per MoE layer: (token, slot) pairs are sorted by global expert id (as in the local dispatcher); the ranks
exchange per-expert token counts (all_gather), then the tokens themselves (all-to-all, differentiable); each
rank regroups what it received by local expert so every expert runs one GEMM on a contiguous slice; results go
back by the reverse all-to-all and are combined at the sender with the routing weights.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import paddle
import paddle.distributed as dist

from ernie5.model.dispatch import ExpertFn, sort_by_expert, unsort_and_combine
from ernie5.parallel.alltoall import all_to_all


def take_rows(x_NH: paddle.Tensor, idx: np.ndarray) -> paddle.Tensor:
    """x[idx] that also works for an empty index (keeps the autograd chain, which every rank must share)."""
    if idx.size == 0:
        return x_NH[:0]
    return paddle.gather(x_NH, paddle.to_tensor(idx, dtype="int64"))


class ExpertParallelDispatcher:
    """Rank `ep_rank` of the group holds global experts [ep_rank * E/ep, (ep_rank + 1) * E/ep)."""

    def __init__(self, num_experts: int, ep: int, ep_rank: int, group, native_alltoall: bool):
        self.E, self.ep, self.me, self.group, self.native = num_experts, ep, ep_rank, group, native_alltoall
        self.per = num_experts // ep

    def _all_counts(self, counts_E: np.ndarray) -> np.ndarray:
        gathered: list[paddle.Tensor] = []
        dist.all_gather(gathered, paddle.to_tensor(np.asarray(counts_E, dtype=np.int64)), group=self.group)
        return np.stack([g.numpy() for g in gathered])  # [ep, E]

    def __call__(self, x_TH: paddle.Tensor, topk_ids_TK: paddle.Tensor, topk_w_TK: paddle.Tensor,
                 counts_E: Sequence[int], expert_fn: ExpertFn) -> paddle.Tensor:
        per, me = self.per, self.me
        order_N, x_sorted_NH = sort_by_expert(x_TH, topk_ids_TK)
        counts_RE = self._all_counts(np.asarray(counts_E))  # every rank's per-expert counts
        send_RR = counts_RE.reshape(self.ep, self.ep, per).sum(2)  # [src, dst] rows
        x_recv = all_to_all(x_sorted_NH, send_RR, self.group, me, self.native)
        mine_RL = counts_RE[:, me * per:(me + 1) * per]  # rows each source sends to each of my experts
        src_start = np.concatenate([[0], np.cumsum(mine_RL.sum(1))[:-1]])
        idx = [np.arange(src_start[s] + mine_RL[s, :l].sum(), src_start[s] + mine_RL[s, :l + 1].sum())
               for l in range(per) for s in range(self.ep)]
        idx = np.concatenate(idx).astype(np.int64) if idx else np.zeros(0, np.int64)
        x_by_expert = take_rows(x_recv, idx)
        outputs, start = [], 0
        for l, n in enumerate(mine_RL.sum(0).tolist()):
            if n:
                outputs.append(expert_fn(l, x_by_expert[start:start + n]))
                start += n
        y_by_expert = paddle.concat(outputs) if outputs else x_by_expert  # empty: keep the chain
        y_recv = take_rows(y_by_expert, np.argsort(idx, kind="stable"))
        y_sorted_NH = all_to_all(y_recv, np.ascontiguousarray(send_RR.T), self.group, me, self.native)
        return unsort_and_combine(y_sorted_NH, order_N, topk_w_TK)
