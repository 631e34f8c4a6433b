"""Tensor-parallel shards <-> global tensors, for checkpoints and gradient bookkeeping.

Checkpoints hold global tensors under global names whatever the layout: a TP rank's shard of a weight (and of
its Adam moments) is gathered over the TP group when saved and cut out of the global tensor when loaded, so a
checkpoint written under TP 2 loads under TP 1 and back (and with any EP / DP change). Gathering a whole tensor
on one TP group is the simple form; at very large scale each rank would write its slice with its offsets.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import paddle

from ernie5.comm.regions import TPGroup, all_gather_list
from ernie5.model.tensor_parallel import Shard


def shard_of(param) -> Optional[tuple[Shard, list[int]]]:
    """(spec, global shape) of a tensor-parallel parameter, None for a whole one."""
    spec = getattr(param, "tp_shard", None)
    return None if spec is None else (spec, list(param.tp_full_shape))


def replication(spec: Shard, tp: TPGroup) -> int:
    """How many TP ranks hold each piece (> 1 for kv heads replicated over ranks)."""
    return tp.degree // spec.shards


def gather_full(value: paddle.Tensor, spec: Shard, full_shape: list[int], tp: TPGroup) -> paddle.Tensor:
    """The global tensor from every TP rank's piece (a collective: every rank of the group calls it)."""
    pieces = all_gather_list(value.contiguous(), tp)
    first = {}  # piece index -> the first rank holding it
    for r in range(tp.degree):
        first.setdefault(r * spec.shards // tp.degree, r)
    ordered = [pieces[first[i]].numpy() for i in range(spec.shards)]
    return paddle.to_tensor(spec.assemble(ordered, full_shape[spec.axis]))


def sum_replicated_grad(param, spec: Shard, tp: TPGroup) -> None:
    """Add the gradients of the ranks holding the same piece (replicated kv heads), in place."""
    grads = all_gather_list(param.grad.contiguous(), tp)
    mine = tp.rank * spec.shards // tp.degree
    same = [g for r, g in enumerate(grads) if r * spec.shards // tp.degree == mine]
    param.grad.set_value(paddle.add_n(same))


def unique_squares(params_sq: list[tuple[object, float]], tp: TPGroup) -> float:
    """Sum of squared gradient norms of sharded parameters over the TP group, each piece counted once."""
    local = sum(sq / replication(shard_of(p)[0], tp) for p, sq in params_sq)
    if not tp.active or tp.group is None:
        return local
    t = paddle.to_tensor(np.array([local], np.float64))
    paddle.distributed.all_reduce(t, group=tp.group)
    return float(t.numpy()[0])
