"""The attention rule of packed rows, written once.

Query i may attend key j iff both lie in the same document and group[j] <= group[i] (< until[j], when keys carry
an `until`): causal across groups, bidirectional inside one, nothing across documents; a key with an `until`
stops being visible from the group `until[j]` on (windowed temporal attention and old-frame masking of video,
`ernie5.data.sequence.frame_until`). A group is one text token, one scale of one visual frame
(every token of a scale is predicted at once, so they see each other: the scale-wise mask of next-scale
prediction) or one audio frame (`ernie5.data.sequence` assigns them). Groups numbered by position give the plain
document-causal mask.

`allowed` uses only indexing with None, `==`, `<=` and `&`, so the same line runs on NumPy arrays and on Paddle
tensors. CPU masks are built in NumPy on purpose: for a [4, 256, 256] mask Paddle's CPU broadcast-compare and
logical-and kernels took ~4 ms of a ~0.4 s bench step, NumPy ~0.5 ms. Accelerators run it as Paddle ops where
the ids live (`ernie5.model.attention`). This module imports no Paddle, so the data layer can use it in NumPy
alone.
"""

from __future__ import annotations

import numpy as np


NEVER = np.iinfo(np.int64).max  # `until` of a key that never expires


def allowed(q_doc_BQ, q_group_BQ, k_doc_BK, k_group_BK, k_until_BK=None):
    """bool [B, Q, K]: query q may attend key k. Queries and keys are passed apart so that incremental decoding
    (new queries against cached and new keys) uses the same rule; a [1, n] operand broadcasts over the batch.
    `k_until_BK` (optional): key k is hidden from queries whose group is >= it."""
    same_doc = q_doc_BQ[:, :, None] == k_doc_BK[:, None, :]
    ok = same_doc & (k_group_BK[:, None, :] <= q_group_BQ[:, :, None])
    if k_until_BK is not None:
        ok = ok & (q_group_BQ[:, :, None] < k_until_BK[:, None, :])
    return ok


def key_spans(allowed_BQK: np.ndarray, tile: int) -> tuple[tuple[int, int, int, int], ...]:
    """Query tiles and the keys they need: (q0, q1, k0, k1) for each run of `tile` queries [q0, q1), with
    [k0, k1) the smallest contiguous key range holding every key some query of the tile may attend in some
    row of the batch. Attention restricted to these spans equals the whole [Q, K] attention: a masked key adds
    exp(-inf) = 0. With packed short documents and causality most of the [Q, K] square lies outside every span
    (digits-world rows, tile 128: the spans cover ~55% of it). A tile none of whose queries may attend anything
    keeps every key (the whole computation's answer for such rows)."""
    any_BK = allowed_BQK.any(axis=0)  # [Q, K]: some row allows it
    Q, K = any_BK.shape
    spans = []
    for q0 in range(0, Q, tile):
        q1 = min(q0 + tile, Q)
        keys = np.flatnonzero(any_BK[q0:q1].any(axis=0))
        spans.append((q0, q1, int(keys[0]), int(keys[-1]) + 1) if keys.size else (q0, q1, 0, K))
    return tuple(spans)


def additive(allowed_BQK: np.ndarray) -> np.ndarray:
    """float32 [B, 1, Q, K] to add to attention scores: 0 where allowed, -inf elsewhere (one mask for all heads)."""
    return np.where(allowed_BQK, np.float32(0.0), np.float32(-np.inf))[:, None]
