"""Grouped-query self-attention with Uni-RoPE and a document-aware causal mask."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie5 import kernels
from ernie5.kernels.fused import MaskedSoftmax
from ernie5.model import mask
from ernie5.model.config import ModelConfig
from ernie5.comm.regions import TPGroup, enter_column, leave_row
from ernie5.model.tensor_parallel import sharded_linear, tp_shard
from ernie5.model.probe import NO_PROBE
from ernie5.model.rope import apply_rope


QUERY_TILE = 128  # queries per tile of the CPU attention (`gqa_attention`, `mask.key_spans`)


def _mask_on_host(*ids) -> paddle.Tensor:
    """`mask.allowed` in NumPy for CPU tensors (see `ernie5.model.mask` for why), as an additive CPU tensor.
    Operands (q_doc, q_group, k_doc, k_group[, k_until]) may already be NumPy arrays. With at least two query
    tiles the tensor carries `key_spans` (`mask.key_spans`), which `gqa_attention` reads to skip keys no query
    of a tile may see; a tensor derived from it (a slice, a copy) has none and is computed whole, so the blocks
    read the spans before recompute copies the mask (`key_spans_of`)."""
    host: dict[int, np.ndarray] = {}  # one copy per distinct tensor (a row attending to itself passes each twice)
    arrays = []
    for t in ids:
        if isinstance(t, paddle.Tensor) and id(t) not in host:
            host[id(t)] = t.numpy()
        arrays.append(host[id(t)] if isinstance(t, paddle.Tensor) else t)
    allowed = mask.allowed(*arrays)
    out = paddle.to_tensor(mask.additive(allowed), place=paddle.CPUPlace())
    if allowed.shape[1] >= 2 * QUERY_TILE:
        out.key_spans = mask.key_spans(allowed, QUERY_TILE)
    return out


def _mask_on_device(*ids) -> paddle.Tensor:
    """`mask.allowed` as Paddle ops where the ids live (accelerators), as an additive tensor."""
    allowed = mask.allowed(*ids)
    zeros = paddle.zeros(allowed.shape, dtype="float32")
    return paddle.where(allowed, zeros, paddle.full_like(zeros, float("-inf"))).unsqueeze(1)


def attention_mask(q_doc_BQ: paddle.Tensor, q_group_BQ: paddle.Tensor, k_doc_BK: paddle.Tensor,
                   k_group_BK: paddle.Tensor, k_until_BK=None) -> paddle.Tensor:
    """Additive float32 mask [B, 1, Q, K] of `ernie5.model.mask.allowed`, built where the ids live."""
    build = _mask_on_host if q_doc_BQ.place.is_cpu_place() else _mask_on_device
    ids = (q_doc_BQ, q_group_BQ, k_doc_BK, k_group_BK) + ((k_until_BK,) if k_until_BK is not None else ())
    return build(*ids)


def group_mask(segment_ids_BS: paddle.Tensor, groups_BS=None, until_BS=None) -> paddle.Tensor:
    """Additive mask [B, 1, S, S] of a row attending to itself (`ernie5.model.mask`: same document, causal across
    groups, bidirectional inside one; a key hidden from the group `until` on). groups None: one group per
    position, i.e. document-causal."""
    if groups_BS is None:  # numbered by position; in NumPy for the host path (a Paddle arange costs ~0.07 ms there)
        S = segment_ids_BS.shape[1]
        groups_BS = np.arange(S, dtype=np.int64)[None] if segment_ids_BS.place.is_cpu_place() else \
            paddle.arange(S, dtype="int64").unsqueeze(0)
    return attention_mask(segment_ids_BS, groups_BS, segment_ids_BS, groups_BS, until_BS)


def document_causal_mask(segment_ids_BS: paddle.Tensor) -> paddle.Tensor:
    """Additive mask [B, 1, S, S]: 0 where key j <= query i and both lie in the same document, else -inf."""
    return group_mask(segment_ids_BS)


def key_spans_of(mask_B1SK) -> Optional[tuple]:
    """The `key_spans` a host-built mask carries (`_mask_on_host`), else None. Callers that hand the mask through
    Paddle's recompute read them first and pass them on as a plain argument: recompute copies its tensor
    arguments, and the copies carry no attributes."""
    return getattr(mask_B1SK, "key_spans", None)


def gqa_attention(q_BSND: paddle.Tensor, k_BSKD: paddle.Tensor, v_BSKD: paddle.Tensor,
                  mask_B1SS: paddle.Tensor, key_spans: Optional[tuple] = None) -> paddle.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for N query heads sharing K kv heads (query head n reads kv head
    n // (N / K)), heads merged: [B, S, N * D].

    The CPU form of attention. Paddle's scaled_dot_product_attention on CPU copies every kv head N / K times and
    adds the [B, 1, S, S] mask by broadcasting over heads, a kernel ~40x slower than a same-shape add (9 ms vs
    0.24 ms at B=4, N=4, S=256). Here each kv head's G = N / K query heads are stacked into one [G*S, D]
    operand (one batched GEMM per kv head, no copies of k or v) and the mask is tiled to all heads first.

    With `key_spans` (`mask.key_spans`; default: the ones the mask carries) it is computed tile by tile: each
    tile of queries against only the keys some query of it may attend (same result; on packed digits-world
    rows ~55% of the scores). Spans that do not fit these shapes are ignored (the whole square is computed).
    """
    spans = key_spans if key_spans is not None else key_spans_of(mask_B1SS)
    S, Sk = q_BSND.shape[1], k_BSKD.shape[1]
    if spans is not None and list(mask_B1SS.shape[-2:]) == [S, Sk] and spans[-1][1] == S \
            and max(k1 for *_, k1 in spans) <= Sk:
        return paddle.concat([_gqa_dense(q_BSND[:, q0:q1], k_BSKD[:, k0:k1], v_BSKD[:, k0:k1],
                                         mask_B1SS[:, :, q0:q1, k0:k1]) for q0, q1, k0, k1 in spans], axis=1)
    return _gqa_dense(q_BSND, k_BSKD, v_BSKD, mask_B1SS)


def _gqa_dense(q_BSND: paddle.Tensor, k_BSKD: paddle.Tensor, v_BSKD: paddle.Tensor,
               mask_B1SS: paddle.Tensor) -> paddle.Tensor:
    """`gqa_attention` over every query and key."""
    B, S, N, D = q_BSND.shape
    Sk, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G = N // K
    q_BKsD = (q_BSND * (D ** -0.5)).transpose([0, 2, 1, 3]).reshape([B, K, G * S, D])
    scores_BKGSS = paddle.matmul(q_BKsD, k_BSKD.transpose([0, 2, 1, 3]), transpose_y=True).reshape([B, K, G, S, Sk])
    if mask_B1SS.shape[1] == 1 and kernels.usable(scores_BKGSS, mask_B1SS):  # mask added and softmax taken in one pass, mask read per head
        probs_BKsS = MaskedSoftmax.apply(scores_BKGSS.reshape([B, N, S, Sk]), mask_B1SS).reshape([B, K, G * S, Sk])
    else:
        mask_BKGSS = paddle.tile(mask_B1SS, [1, N, 1, 1]).reshape([mask_B1SS.shape[0], K, G, S, Sk])
        probs_BKsS = F.softmax(scores_BKGSS + mask_BKGSS, axis=-1).reshape([B, K, G * S, Sk])
    out_BKsD = paddle.matmul(probs_BKsS, v_BSKD.transpose([0, 2, 1, 3]))
    return out_BKsD.reshape([B, K, G, S, D]).transpose([0, 3, 1, 2, 4]).reshape([B, S, N * D])


class KVCache:
    """Keys and values of the positions fed so far, per layer, with their documents and groups: incremental
    decoding feeds only new positions (`UnifiedModel.backbone(..., cache=)`). New queries see cached and new keys
    under the same rule (`ernie5.model.mask`: same document, group[key] <= group[query])."""

    def __init__(self, num_layers: int):
        self.keys: list = [None] * num_layers
        self.values: list = [None] * num_layers
        self.doc_BS = None
        self.group_BS = None
        self.until_BS = None

    @property
    def length(self) -> int:
        return 0 if self.doc_BS is None else int(self.doc_BS.shape[1])

    def extend(self, segment_ids_BS: paddle.Tensor, groups_BS=None, until_BS=None) -> paddle.Tensor:
        """Record the new positions' documents, groups (None: one group per position, i.e. causal) and `until`
        (None: never expire) and return the additive mask [B, 1, S_new, S_cached + S_new]."""
        B, S = segment_ids_BS.shape
        if groups_BS is None:
            groups_BS = paddle.arange(self.length, self.length + S, dtype="int64").unsqueeze(0).expand([B, S])
        if until_BS is None:
            until_BS = paddle.full([B, S], mask.NEVER, dtype="int64")
        doc, grp, until = segment_ids_BS.astype("int64"), groups_BS.astype("int64"), until_BS.astype("int64")
        if self.doc_BS is not None:
            doc, grp = paddle.concat([self.doc_BS, doc], 1), paddle.concat([self.group_BS, grp], 1)
            until = paddle.concat([self.until_BS, until], 1)
        self.doc_BS, self.group_BS, self.until_BS = doc, grp, until
        return attention_mask(doc[:, -S:], grp[:, -S:], doc, grp, until)

    def append(self, layer: int, k_BSND: paddle.Tensor, v_BSND: paddle.Tensor):
        """Store layer `layer`'s new keys / values; returns all of them (cached first)."""
        if self.keys[layer] is not None:
            k_BSND = paddle.concat([self.keys[layer], k_BSND], 1)
            v_BSND = paddle.concat([self.values[layer], v_BSND], 1)
        self.keys[layer], self.values[layer] = k_BSND, v_BSND
        return k_BSND, v_BSND


class Attention(nn.Layer):
    """q/k/v/o projections without bias; GQA (kv heads shared by groups of query heads).

    Tensor parallelism (`tp`, degree P) splits the heads: rank r holds query heads [r N/P, (r+1) N/P) (q columns,
    o rows) and the kv heads they read: K/P of them when P divides K, else the one kv head its query heads share,
    replicated on P/K ranks (P must then be a multiple of K). Query head n reads kv head n // (N/K) either way.
    `qkv` takes the block's normed input as it is between TP regions (a sequence shard under sequence
    parallelism) and gathers / copies it; `out` leaves through the row-parallel region."""

    probe = NO_PROBE  # RoPE runs through it (`ernie5.model.probe`)

    def __init__(self, cfg: ModelConfig, tp: Optional[TPGroup] = None):
        super().__init__()
        P = tp.degree if tp is not None else 1
        self.tp = tp
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads // P, max(cfg.num_kv_heads // P, 1), \
            cfg.dim_head
        std, H, D = cfg.init_std, cfg.hidden_size, cfg.dim_head
        kv = tp_shard(tp, axis=1, shards=min(cfg.num_kv_heads, P))
        self.q_proj = sharded_linear(H, cfg.num_heads * D, std, tp_shard(tp, axis=1))
        self.k_proj = sharded_linear(H, cfg.num_kv_heads * D, std, kv)
        self.v_proj = sharded_linear(H, cfg.num_kv_heads * D, std, kv)
        self.o_proj = sharded_linear(cfg.num_heads * D, H, std / math.sqrt(2 * cfg.num_layers),
                                     tp_shard(tp, axis=0))

    def out(self, o_BSX: paddle.Tensor) -> paddle.Tensor:
        """Output projection; under TP the partial sums leave through the row-parallel region."""
        return leave_row(self.o_proj(o_BSX), self.tp)

    def qkv(self, x_BSH, cos, sin):
        """Projections with RoPE applied to q and k (k and v keep num_kv_heads heads)."""
        x_BSH = enter_column(x_BSH, self.tp)
        B, S, _ = x_BSH.shape
        run = self.probe.run
        q = run("norms_rope", "apply_rope", apply_rope,
                self.q_proj(x_BSH).reshape([B, S, self.num_heads, self.head_dim]), cos, sin)
        k = run("norms_rope", "apply_rope", apply_rope,
                self.k_proj(x_BSH).reshape([B, S, self.num_kv_heads, self.head_dim]), cos, sin)
        v = self.v_proj(x_BSH).reshape([B, S, self.num_kv_heads, self.head_dim])
        return q, k, v  # GQA: scaled_dot_product_attention shares each kv head over its query-head group

    def core(self, q_BSND, k_BSND, v_BSND, mask_B1SS, key_spans: Optional[tuple] = None):
        """softmax(q k^T / sqrt(d) + mask) v, heads merged: [B, S, N * D]. Accelerators take Paddle's fused
        scaled_dot_product_attention (flash attention on GPUs; not run here), CPUs `gqa_attention`."""
        B, S = q_BSND.shape[:2]
        if not q_BSND.place.is_cpu_place():
            out = F.scaled_dot_product_attention(q_BSND, k_BSND, v_BSND, attn_mask=mask_B1SS)
            return out.reshape([B, S, self.num_heads * self.head_dim])
        return gqa_attention(q_BSND, k_BSND, v_BSND, mask_B1SS, key_spans)

    def forward(self, x_BSH, cos, sin, mask_B1SS):
        return self.out(self.core(*self.qkv(x_BSH, cos, sin), mask_B1SS))
