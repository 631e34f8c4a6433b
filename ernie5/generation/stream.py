"""One document being generated: the positions fed so far and the KV cache (incremental decoding).

Positions are fed in the `ernie5.data.sequence.build_document` array format (token, modality, pos, group, scale,
audio, vis_in, und_index + und_table) with absolute positions and groups, so generation lays a document out
exactly as training did. With the cache only the new positions run through the backbone; without it (the
reference the tests compare against) the whole document is re-run each time and the last positions are read.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import paddle

from ernie5.constants import AUDIO, TEXT
from ernie5.data.sequence import vis_width
from ernie5.model.attention import KVCache

ROW_FIELDS = ("token", "modality", "pos", "group", "scale", "audio", "vis_in", "und_index")


def text_rows(ids: list[int], pos: int, group: int, bits: int = 1, levels: int = 1) -> dict:
    """Rows of text / special tokens appended at RoPE index `pos` and group `group` (one group per token)."""
    n = len(ids)
    idx = np.arange(n)
    return {"token": np.asarray(ids, np.int32), "modality": np.full(n, TEXT, np.int8),
            "pos": np.repeat((pos + idx)[:, None], 3, 1).astype(np.float32), "group": (group + idx).astype(np.int32),
            "scale": np.full(n, -1, np.int16), "audio": np.full((n, levels), -1, np.int16),
            "vis_in": np.zeros((n, vis_width(bits)), np.float32), "und_index": np.full(n, -1, np.int32),
            "und_table": None}


def audio_frame_rows(codes_L: np.ndarray, pos: int, group: int, bits: int = 1) -> dict:
    """One audio frame (all L codes) at RoPE index `pos`, its own group."""
    codes_L = np.asarray(codes_L, np.int16)
    r = text_rows([int(codes_L[0])], pos, group, bits, len(codes_L))
    r["modality"][:] = AUDIO
    r["audio"][0] = codes_L
    return r


def slice_rows(rows: dict, sel) -> dict:
    """Rows `sel` (slice, index array or bool mask) of a document's arrays; the und_table is kept whole."""
    out = {k: rows[k][sel] for k in ROW_FIELDS}
    out["und_table"] = rows.get("und_table")
    return out


def _concat(a: Optional[dict], b: dict) -> dict:
    if a is None:
        return {**{k: np.array(b[k]) for k in ROW_FIELDS}, "und_table": b.get("und_table")}
    n_und = 0 if a["und_table"] is None else len(a["und_table"])
    out = {k: np.concatenate([a[k], b[k]]) for k in ROW_FIELDS}
    out["und_index"][len(a["token"]):] = np.where(b["und_index"] >= 0, b["und_index"] + n_und, -1)
    tables = [t for t in (a["und_table"], b.get("und_table")) if t is not None]
    out["und_table"] = np.concatenate(tables) if tables else None
    return out


class Stream:
    """Feeds a document position by position (batch of one) and returns final-normed hidden states."""

    def __init__(self, model, use_cache: bool = True):
        self.model = model
        self.cache = KVCache(len(model.layers)) if use_cache else None
        self.rows: Optional[dict] = None  # everything fed so far (the no-cache path re-runs it)
        self.next_pos, self.next_group = 0, 0

    def _embed(self, r: dict) -> paddle.Tensor:
        m = self.model
        tok = paddle.to_tensor(r["token"].astype(np.int64)[None])
        if m.io is None:
            if (r["modality"] != TEXT).any():
                raise ValueError("this model has no multimodal inputs (model.multimodal.enabled is false)")
            return m.embed(tok)
        und = r["und_index"] >= 0
        table = r.get("und_table")
        feats = (table[r["und_index"][und]] if und.any() else np.zeros((0, 1, 1))).astype(np.float32)
        b = {"token": tok, "modality": paddle.to_tensor(r["modality"].astype(np.int64)[None]),
             "vis_in": paddle.to_tensor(r["vis_in"].astype(np.float32)[None]),
             "scale": paddle.to_tensor(r["scale"].astype(np.int64)[None]),
             "audio": paddle.to_tensor(r["audio"].astype(np.int64)[None]),
             "und_index": paddle.to_tensor(r["und_index"].astype(np.int64)[None]),
             "und_feats": paddle.to_tensor(feats),
             "und_flat_pos": paddle.to_tensor(np.nonzero(und)[0].astype(np.int64))}
        return m.embed_unified(b)

    @paddle.no_grad()
    def feed(self, rows: dict) -> paddle.Tensor:
        """Append positions (absolute pos / group); returns their final-normed hidden states [n, H]. The next
        text or audio position continues after the last one fed (RoPE index + 1, a new group)."""
        n = len(rows["token"])
        self.rows = _concat(self.rows, rows)
        r = rows if self.cache is not None else self.rows
        emb = self._embed(r)
        S = len(r["token"])
        out = self.model.backbone(None, paddle.to_tensor(r["pos"].astype(np.float32)[None]),
                                  paddle.zeros([1, S], dtype="int64"), embeds_BSH=emb,
                                  groups_BS=paddle.to_tensor(r["group"].astype(np.int64)[None]),
                                  modality_BS=paddle.to_tensor(r["modality"].astype(np.int64)[None]),
                                  cache=self.cache)
        self.next_pos = int(rows["pos"][-1, 0]) + 1
        self.next_group = int(rows["group"][-1]) + 1
        return self.model.norm(out.hidden_BSH)[0, S - n:]

    def feed_text(self, ids: list[int]) -> paddle.Tensor:
        mm = self.model.cfg.multimodal
        return self.feed(text_rows(ids, self.next_pos, self.next_group, max(mm.visual_bits, 1),
                                   max(mm.audio_levels, 1)))

    def feed_audio_frame(self, codes_L: np.ndarray) -> paddle.Tensor:
        return self.feed(audio_frame_rows(codes_L, self.next_pos, self.next_group,
                                          max(self.model.cfg.multimodal.visual_bits, 1)))


# -- sampling (numpy, seeded: reproducible) -------------------------------------------------------------------
def sample_categorical(logits_V: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """argmax for temperature <= 0, else a draw from softmax(logits / temperature)."""
    logits_V = np.asarray(logits_V, np.float64)
    if temperature <= 0:
        return int(np.argmax(logits_V))
    z = logits_V / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(len(p), p=p))


def sample_bits(logits_ND: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 bits: logit > 0 for temperature <= 0, else Bernoulli(sigmoid(logit / temperature)) per bit."""
    logits_ND = np.asarray(logits_ND, np.float64)
    if temperature <= 0:
        return (logits_ND > 0).astype(np.uint8)
    p = 1.0 / (1.0 + np.exp(-logits_ND / temperature))
    return (rng.random(p.shape) < p).astype(np.uint8)
