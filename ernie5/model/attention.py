"""Grouped-query self-attention with Uni-RoPE and a document-aware causal mask."""

from __future__ import annotations

import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie5.model.config import ModelConfig
from ernie5.model.layers import linear
from ernie5.model.rope import apply_rope


def document_causal_mask(segment_ids_BS: paddle.Tensor) -> paddle.Tensor:
    """Additive mask [B, 1, S, S]: 0 where key j <= query i and both lie in the same document, else -inf."""
    S = segment_ids_BS.shape[1]
    same_doc = segment_ids_BS.unsqueeze(2) == segment_ids_BS.unsqueeze(1)
    causal = paddle.tril(paddle.ones([S, S], dtype="bool"))
    allowed = paddle.logical_and(same_doc, causal.unsqueeze(0))
    zeros = paddle.zeros(allowed.shape, dtype="float32")
    return paddle.where(allowed, zeros, paddle.full_like(zeros, float("-inf"))).unsqueeze(1)


class Attention(nn.Layer):
    """q/k/v/o projections without bias; GQA (kv heads shared by groups of query heads)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.dim_head
        std, H = cfg.init_std, cfg.hidden_size
        self.q_proj = linear(H, self.num_heads * self.head_dim, std)
        self.k_proj = linear(H, self.num_kv_heads * self.head_dim, std)
        self.v_proj = linear(H, self.num_kv_heads * self.head_dim, std)
        self.o_proj = linear(self.num_heads * self.head_dim, H, std / math.sqrt(2 * cfg.num_layers))

    def qkv(self, x_BSH, cos, sin):
        """Projections with RoPE applied to q and k (k and v keep num_kv_heads heads)."""
        B, S, _ = x_BSH.shape
        q = apply_rope(self.q_proj(x_BSH).reshape([B, S, self.num_heads, self.head_dim]), cos, sin)
        k = apply_rope(self.k_proj(x_BSH).reshape([B, S, self.num_kv_heads, self.head_dim]), cos, sin)
        v = self.v_proj(x_BSH).reshape([B, S, self.num_kv_heads, self.head_dim])
        return q, k, v  # GQA: scaled_dot_product_attention shares each kv head over its query-head group

    def core(self, q_BSND, k_BSND, v_BSND, mask_B1SS):
        """softmax(q k^T / sqrt(d) + mask) v, heads merged: [B, S, N * D]."""
        B, S = q_BSND.shape[:2]
        out = F.scaled_dot_product_attention(q_BSND, k_BSND, v_BSND, attn_mask=mask_B1SS)
        return out.reshape([B, S, self.num_heads * self.head_dim])

    def forward(self, x_BSH, cos, sin, mask_B1SS):
        return self.o_proj(self.core(*self.qkv(x_BSH, cos, sin), mask_B1SS))
