"""Uni-RoPE: interleaved rotary embedding driven by (t, h, w) positions. Text and audio advance all three
together, a visual token takes its frame (t) and cell (h, w): one rotary scheme for every modality (ERNIE 5.0).

Frequency pair i has inverse frequency theta^(-2i/D). The pairs are split into t / h / w sections: t takes the
last `t` pairs (lowest frequencies), the first h + w pairs alternate h, w, h, w, ... (ERNIE 4.5 VL layout).
With t = h = w every pair sees the same position, which is exactly 1-D RoPE.
Interleaved form: pair i is the channels (2i, 2i+1), as in ERNIE 4.5 checkpoints.
"""

from __future__ import annotations

import numpy as np
import paddle

from ernie5 import kernels
from ernie5.kernels.fused import RopeFused


def pair_axes(sections_thw: list[int]) -> np.ndarray:
    """Axis (0=t, 1=h, 2=w) of each frequency pair."""
    t, h, w = sections_thw
    axes, nh, nw = [], h, w
    while nh or nw:
        if nh:
            axes.append(1)
            nh -= 1
        if nw:
            axes.append(2)
            nw -= 1
    return np.array(axes + [0] * t, dtype=np.int64)


def frequency_table(head_dim: int, theta: float, sections_thw: list[int]) -> np.ndarray:
    """[3, head_dim/2] matrix A with A[a, i] = inv_freq_i if pair i reads axis a, else 0; angles = pos_thw @ A."""
    pairs = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(pairs, dtype=np.float64) * 2.0 / head_dim))
    table = np.zeros((3, pairs), dtype=np.float64)
    table[pair_axes(sections_thw), np.arange(pairs)] = inv_freq
    return table.astype(np.float32)


def rope_cos_sin(pos_thw_BS3: paddle.Tensor, table_3P: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """cos and signed sin per channel, [B, S, 1, D] (each pair's angle repeated on its two channels; the sin of
    channel 2i carries the minus sign of the rotation), computed once per forward for all layers."""
    angles_BSP = paddle.matmul(pos_thw_BS3.astype("float32"), table_3P)
    cos_BSD = paddle.repeat_interleave(paddle.cos(angles_BSP), 2, axis=-1)
    sin_BSD = paddle.repeat_interleave(paddle.sin(angles_BSP), 2, axis=-1)
    sign_D = paddle.to_tensor([-1.0, 1.0] * (table_3P.shape[1]), dtype="float32")
    return cos_BSD.unsqueeze(2), (sin_BSD * sign_D).unsqueeze(2)


_SWAP: dict = {}


def pair_swap_matrix(head_dim: int, dtype) -> paddle.Tensor:
    """[D, D] permutation P with (x P)[2i] = x[2i+1], (x P)[2i+1] = x[2i] (cached per head_dim and dtype)."""
    key = (head_dim, str(dtype))
    if key not in _SWAP:
        p = np.zeros((head_dim, head_dim), dtype=np.float32)
        p[np.arange(head_dim) ^ 1, np.arange(head_dim)] = 1.0
        _SWAP[key] = paddle.to_tensor(p).astype(dtype)
    return _SWAP[key]


def apply_rope(x_BSND: paddle.Tensor, cos_BS1D: paddle.Tensor, ssin_BS1D: paddle.Tensor) -> paddle.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [B, S, heads, D]: (x0, x1) -> (x0 c - x1 s, x1 c + x0 s).

    Written as x * cos + swap_pairs(x) * signed_sin with the pair swap as a GEMM by a permutation matrix and the
    tables tiled to all heads: Paddle's CPU kernels for a flip and for a broadcast over the heads axis were
    each several times slower than the whole rotation done this way (6.4 ms -> 2.0 ms forward + backward at
    B=4, S=256, N=4, D=64). The permutation makes the swap exact."""
    N, D = x_BSND.shape[2], x_BSND.shape[3]
    fused_shape = cos_BS1D.shape[0] in (1, x_BSND.shape[0]) and cos_BS1D.shape[1:] == [x_BSND.shape[1], 1, D]
    if fused_shape and kernels.usable(x_BSND, cos_BS1D, ssin_BS1D):
        return RopeFused.apply(x_BSND, cos_BS1D, ssin_BS1D)  # one pass, tables read in place for every head
    if cos_BS1D.shape[2] != N:
        cos_BS1D, ssin_BS1D = paddle.tile(cos_BS1D, [1, 1, N, 1]), paddle.tile(ssin_BS1D, [1, 1, N, 1])
    return x_BSND * cos_BS1D + paddle.matmul(x_BSND, pair_swap_matrix(D, x_BSND.dtype)) * ssin_BS1D


def text_positions(segment_ids_BS: np.ndarray) -> np.ndarray:
    """(t, h, w) = (i, i, i) with i counting from 0 inside each document of a packed row: [B, S, 3] int64."""
    B, S = segment_ids_BS.shape
    idx = np.broadcast_to(np.arange(S), (B, S))
    starts = np.zeros((B, S), dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]
    start_idx = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    pos = (idx - start_idx).astype(np.int64)
    return np.repeat(pos[:, :, None], 3, axis=2)
