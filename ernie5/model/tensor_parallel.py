"""Tensor-parallel weights: which slice of each global weight a rank holds, and how it is initialised.

A sharded parameter carries `param.tp_shard` (a `Shard`): the global tensor is cut along `axis` into `parts`
equal blocks (2 for the fused gate/up weight: gate columns, then up columns), each block into `shards` pieces
(piece i spans [i m / shards, (i + 1) m / shards) of a block of length m), and the rank holds piece `index` of
every block, concatenated. `shards` is the TP degree, except for key / value projections when there are fewer kv
heads than ranks: then each kv head is replicated on degree / num_kv_heads consecutive ranks (`shards` =
num_kv_heads, `index` = rank // (degree / num_kv_heads)), and those ranks add their gradients.

Parameters that a TP rank applies to its own sequence shard (sequence parallelism: norms, routers, routed
experts, MTP projections) carry `param.sequence_parallel = True`: their gradients are summed over the group.

Initialisation draws the *global* tensor from Paddle's generator and keeps the rank's piece (`ShardedNormal`),
so the generator advances exactly as in one process and a TP run starts from the one-process weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle import _C_ops

from ernie5.comm.regions import TPGroup, enter_column, leave_row, reduce_from
from ernie5.model.layers import Linear, SwiGLU


@dataclass(frozen=True)
class Shard:
    axis: int
    shards: int
    index: int
    parts: int = 1

    def bounds(self, n: int) -> list[tuple[int, int]]:
        """[start, end) ranges along `axis` (global length n) that make up this rank's piece."""
        m = n // self.parts
        a, b = self.index * m // self.shards, (self.index + 1) * m // self.shards
        return [(p * m + a, p * m + b) for p in range(self.parts)]

    def local_len(self, n: int) -> int:
        return sum(b - a for a, b in self.bounds(n))

    def take(self, full):
        """This rank's piece of a global tensor (NumPy array or paddle Tensor)."""
        idx = [slice(None)] * len(full.shape)
        pieces = []
        for a, b in self.bounds(full.shape[self.axis]):
            idx[self.axis] = slice(a, b)
            pieces.append(full[tuple(idx)])
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces, self.axis) if isinstance(full, np.ndarray) else paddle.concat(pieces, self.axis)

    def assemble(self, pieces: list[np.ndarray], full_len: int) -> np.ndarray:
        """The global tensor from every piece index's local tensor (`pieces[i]`: piece i, as `take` cut it)."""
        blocks = []
        for p in range(self.parts):
            for i, piece in enumerate(pieces):
                spec = Shard(self.axis, self.shards, i, self.parts)
                off = sum(b - a for a, b in spec.bounds(full_len)[:p])
                n = spec.bounds(full_len)[p][1] - spec.bounds(full_len)[p][0]
                idx = [slice(None)] * piece.ndim
                idx[self.axis] = slice(off, off + n)
                blocks.append(piece[tuple(idx)])
        return np.concatenate(blocks, self.axis)


def local_shape(full_shape: list[int], spec: Optional[Shard]) -> list[int]:
    if spec is None:
        return list(full_shape)
    shape = list(full_shape)
    shape[spec.axis] = spec.local_len(full_shape[spec.axis])
    return shape


class ShardedNormal(nn.initializer.Normal):
    """N(0, std) of the global shape from Paddle's generator (as one process draws it), keeping this rank's piece."""

    def __init__(self, std: float, full_shape: list[int], spec: Shard):
        super().__init__(0.0, std)
        self.full_shape, self.spec = list(full_shape), spec

    def forward(self, var, block=None):
        block = self._check_block(block)
        if self._seed == 0:
            self._seed = block.program.random_seed
        full = _C_ops.gaussian(self.full_shape, self._mean, self._std_dev, self._seed, var.dtype,
                               paddle.framework._current_expected_place())
        self.spec.take(full).contiguous()._share_underline_tensor_to(var)
        return None


def tp_shard(tp: Optional[TPGroup], axis: int, parts: int = 1, shards: Optional[int] = None) -> Optional[Shard]:
    """The slice a rank of `tp` holds (None without tensor parallelism). `shards` < degree: replicated pieces."""
    if tp is None or not tp.active:
        return None
    shards = shards or tp.degree
    return Shard(axis, shards, tp.rank * shards // tp.degree, parts)


def sharded_linear(in_features: int, out_features: int, std: float, spec: Optional[Shard]) -> Linear:
    """Bias-free Linear of global shape [in, out] holding the piece `spec` names (the whole weight if None)."""
    full = [in_features, out_features]
    shape = local_shape(full, spec)
    init = ShardedNormal(std, full, spec) if spec is not None else nn.initializer.Normal(0.0, std)
    layer = Linear(shape[0], shape[1], weight_attr=paddle.ParamAttr(initializer=init), bias_attr=False)
    layer.weight.tp_shard, layer.weight.tp_full_shape = spec, full
    return layer


def mark_sequence_parallel(layer: nn.Layer, tp: Optional[TPGroup]) -> None:
    """Flag every parameter of `layer` as applied to this rank's sequence shard (gradients summed over TP)."""
    if tp is not None and tp.active and tp.sequence_parallel:
        for p in layer.parameters():
            p.sequence_parallel = True


class VocabEmbedding(nn.Layer):
    """Token embedding [V, H]; under TP each rank holds a contiguous vocabulary range and the group adds up the
    lookups (a token outside the range contributes 0). Also the tied output head's weight."""

    def __init__(self, vocab_size: int, hidden_size: int, std: float, tp: Optional[TPGroup] = None):
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        self.spec = tp_shard(tp, axis=0)
        full = [vocab_size, hidden_size]
        init = ShardedNormal(std, full, self.spec) if self.spec is not None else nn.initializer.Normal(0.0, std)
        self.weight = self.create_parameter(local_shape(full, self.spec), attr=paddle.ParamAttr(initializer=init))
        self.weight.tp_shard, self.weight.tp_full_shape = self.spec, full
        self.vocab_start = self.spec.bounds(vocab_size)[0][0] if self.spec is not None else 0

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        if self.spec is None:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        inside = paddle.logical_and(local >= 0, local < self.weight.shape[0])
        emb = F.embedding(paddle.where(inside, local, paddle.zeros_like(local)), self.weight)
        return reduce_from(emb * inside.unsqueeze(-1).astype(emb.dtype), self.tp)


class ParallelSwiGLU(SwiGLU):
    """SwiGLU FFN split over TP ranks: gate/up column-parallel (each rank holds matching gate and up columns),
    down row-parallel; activations enter through `enter_column` and leave through `leave_row`. The dense FFN and
    the shared experts. Without tensor parallelism it is exactly `SwiGLU` (same weights, same draws)."""

    def __init__(self, hidden_size: int, ffn_size: int, std: float, tp: Optional[TPGroup] = None,
                 recompute_gate_up: bool = False):
        nn.Layer.__init__(self)
        self.tp = tp
        self.recompute_gate_up = recompute_gate_up
        col, row = tp_shard(tp, axis=1, parts=2), tp_shard(tp, axis=0)
        self.ffn_size = ffn_size if col is None else ffn_size // tp.degree
        self.gate_up = sharded_linear(hidden_size, 2 * ffn_size, std, col)
        self.down = sharded_linear(ffn_size, hidden_size, std, row)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return leave_row(super().forward(enter_column(x, self.tp)), self.tp)
