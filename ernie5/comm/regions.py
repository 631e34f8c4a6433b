"""Tensor- and sequence-parallel regions (Megatron-LM's), as autograd functions over `paddle.distributed`.

A tensor-parallel (TP) group of `degree` ranks splits each block's GEMMs: column-parallel weights (q/k/v,
gate/up, the vocabulary) give each rank a slice of the output features, row-parallel ones (o, down) a partial
sum that the group adds up. The regions connect them:

| region | forward | backward | where |
|---|---|---|---|
| `copy_to` | identity | all-reduce | full activations entering column-parallel GEMMs (no SP) |
| `reduce_from` | all-reduce | identity | partial sums leaving row-parallel GEMMs (no SP); summed losses |
| `gather_seq` | all-gather (sequence) | reduce-scatter | SP shards entering column-parallel GEMMs |
| `reduce_scatter_seq` | reduce-scatter | all-gather | partial sums leaving row-parallel GEMMs (SP) |
| `scatter_seq` | keep own shard | all-gather | replicated activations becoming SP shards |
| `gather_seq_replicated` | all-gather | keep own shard | SP shards becoming replicated activations whose
  gradient is the same on every rank (the backbone's output: every consumer downstream is replicated or enters a
  column-parallel GEMM through `copy_to`) |

Sequence shards are contiguous: rank r holds positions [r S / degree, (r + 1) S / degree) of axis 1.
Gloo (CPU) has no reduce-scatter: there it is all-reduce + slice (exact, `degree` times the traffic); NCCL uses
the native collective. Every function is the identity for a group of one rank, and `TPGroup.group` None (a
model built for counting or for one process) never communicates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.autograd import PyLayer


@dataclass(frozen=True)
class TPGroup:
    """This rank's place in its tensor-parallel group."""

    degree: int = 1
    rank: int = 0
    sequence_parallel: bool = False
    group: Any = None  # paddle's communication group (None: build only, no collectives)
    native: bool = False  # NCCL: native reduce-scatter

    @property
    def active(self) -> bool:
        return self.degree > 1

    def seq_slice(self, S: int) -> tuple[int, int]:
        """[start, end) of this rank's sequence shard of S positions."""
        if S % self.degree:
            raise ValueError(f"sequence length {S} is not divisible by the tensor-parallel degree {self.degree}")
        n = S // self.degree
        return self.rank * n, (self.rank + 1) * n


def _all_reduce(x: paddle.Tensor, tp: TPGroup, op=None) -> paddle.Tensor:
    out = x.clone()
    dist.all_reduce(out, op=op or dist.ReduceOp.SUM, group=tp.group)
    return out


def _all_gather_seq(x: paddle.Tensor, tp: TPGroup) -> paddle.Tensor:
    parts: list = []
    dist.all_gather(parts, x.contiguous() if hasattr(x, "contiguous") else x, group=tp.group)
    return paddle.concat(parts, axis=1)


def _own_shard(x: paddle.Tensor, tp: TPGroup) -> paddle.Tensor:
    a, b = tp.seq_slice(x.shape[1])
    return x[:, a:b]


def _reduce_scatter_seq(x: paddle.Tensor, tp: TPGroup) -> paddle.Tensor:
    if tp.native:
        pieces = [p.contiguous() for p in paddle.split(x, tp.degree, axis=1)]
        out = paddle.empty_like(pieces[0])
        dist.reduce_scatter(out, pieces, group=tp.group)
        return out
    return _own_shard(_all_reduce(x, tp), tp).contiguous()


class _Region(PyLayer):
    """forward / backward chosen by name (one PyLayer class keeps the table above in one place)."""

    @staticmethod
    def forward(ctx, x, tp: TPGroup, fwd: str, bwd: str):
        ctx.tp, ctx.bwd = tp, bwd
        return _OPS[fwd](x, tp)

    @staticmethod
    def backward(ctx, dy):
        return _OPS[ctx.bwd](dy, ctx.tp)


_OPS = {
    "identity": lambda x, tp: x.clone(),
    "all_reduce": _all_reduce,
    "all_gather": _all_gather_seq,
    "reduce_scatter": _reduce_scatter_seq,
    "shard": lambda x, tp: _own_shard(x, tp).contiguous(),
}


def _region(x, tp: Optional[TPGroup], fwd: str, bwd: str):
    if tp is None or not tp.active or tp.group is None:
        return x
    return _Region.apply(x, tp, fwd, bwd)


# the regions of the table in the module docstring: region(x, tp)
copy_to = functools.partial(_region, fwd="identity", bwd="all_reduce")
reduce_from = functools.partial(_region, fwd="all_reduce", bwd="identity")
gather_seq = functools.partial(_region, fwd="all_gather", bwd="reduce_scatter")
reduce_scatter_seq = functools.partial(_region, fwd="reduce_scatter", bwd="all_gather")
scatter_seq = functools.partial(_region, fwd="shard", bwd="all_gather")
gather_seq_replicated = functools.partial(_region, fwd="all_gather", bwd="shard")


def enter_column(x, tp):
    """Activations entering a column-parallel GEMM: SP shards are gathered, full ones copied."""
    if tp is None or not tp.active:
        return x
    return gather_seq(x, tp) if tp.sequence_parallel else copy_to(x, tp)


def leave_row(x, tp):
    """Partial sums leaving a row-parallel GEMM: reduce-scattered to SP shards, or all-reduced."""
    if tp is None or not tp.active:
        return x
    return reduce_scatter_seq(x, tp) if tp.sequence_parallel else reduce_from(x, tp)


def sum_numpy(x: np.ndarray, tp: Optional[TPGroup]) -> np.ndarray:
    """Sum a (non-differentiable) NumPy array over the group when ranks hold different tokens (SP)."""
    if tp is None or not tp.active or tp.group is None or not tp.sequence_parallel:
        return x
    t = paddle.to_tensor(np.ascontiguousarray(x, dtype=np.float64))
    dist.all_reduce(t, group=tp.group)
    return t.numpy().astype(x.dtype)


def all_reduce_max(x: paddle.Tensor, tp: TPGroup) -> paddle.Tensor:
    """Elementwise max over the group (no autograd)."""
    return _all_reduce(x, tp, dist.ReduceOp.MAX) if tp.group is not None and tp.active else x


def all_reduce_sum(x: paddle.Tensor, tp: TPGroup) -> paddle.Tensor:
    """Elementwise sum over the group (no autograd)."""
    return _all_reduce(x, tp) if tp.group is not None and tp.active else x


def all_gather_list(x: paddle.Tensor, tp: TPGroup) -> list:
    """Every rank's `x` (same shape on every rank), in rank order (no autograd)."""
    parts: list = []
    dist.all_gather(parts, x, group=tp.group)
    return parts
