"""Batched generation for the cross-modal scores: B documents of the *same layout* (same length, positions and
groups) fed side by side through one KV cache, so hundreds of held-out items take seconds, not minutes.

Every document in a batch is laid out exactly as `ernie5.generation.tasks` lays out one (`build_document`), and
the batch's rows never see each other (one row = one document), so each row's result is what the one-document
path (`tasks.continue_text`, `tasks.generate_image`) gives, up to float rounding of batched matrix products.
Callers group their items by layout (captions: all alike; speech: by frame count; text -> image: by prompt).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import paddle

from ernie5.constants import IMAGE
from ernie5.data.sequence import Segment
from ernie5.generation import tasks as T
from ernie5.generation.stream import ROW_FIELDS, sample_bits, text_rows
from ernie5.model.attention import KVCache
from ernie5.modality.bitwise import scale_schedule


class BatchStream:
    """`Stream` for B documents of one layout: `feed` takes B row dicts of equal length (or one dict of [B, n]
    arrays) and returns the final-normed hidden states [B, n, H]."""

    def __init__(self, model):
        self.model = model
        self.cache = KVCache(len(model.layers))
        self.next_pos, self.next_group = 0, 0

    def _embed(self, rows: list[dict]) -> paddle.Tensor:
        B, n = len(rows), len(rows[0]["token"])
        st = {k: np.stack([r[k] for r in rows]) for k in ROW_FIELDS}
        und = st["und_index"] >= 0
        feats = [r["und_table"][r["und_index"][r["und_index"] >= 0]] for r in rows if (r["und_index"] >= 0).any()]
        b = {"token": paddle.to_tensor(st["token"].astype(np.int64)),
             "modality": paddle.to_tensor(st["modality"].astype(np.int64)),
             "vis_in": paddle.to_tensor(st["vis_in"].astype(np.float32)),
             "scale": paddle.to_tensor(st["scale"].astype(np.int64)),
             "audio": paddle.to_tensor(st["audio"].astype(np.int64)),
             "und_index": paddle.to_tensor(st["und_index"].astype(np.int64)),
             "und_feats": paddle.to_tensor(np.concatenate(feats).astype(np.float32) if feats
                                           else np.zeros((0, 1, 1), np.float32)),
             "und_flat_pos": paddle.to_tensor(np.nonzero(und.reshape(B * n))[0].astype(np.int64))}
        return self.model.embed_unified(b), st

    @paddle.no_grad()
    def feed(self, rows: list[dict]) -> paddle.Tensor:
        n = len(rows[0]["token"])
        if any(len(r["token"]) != n for r in rows):
            raise ValueError("a batch's documents must have the same layout (same number of positions)")
        emb, st = self._embed(rows)
        B = len(rows)
        out = self.model.backbone(None, paddle.to_tensor(st["pos"].astype(np.float32)),
                                  paddle.zeros([B, n], dtype="int64"), embeds_BSH=emb,
                                  groups_BS=paddle.to_tensor(st["group"].astype(np.int64)),
                                  modality_BS=paddle.to_tensor(st["modality"].astype(np.int64)), cache=self.cache)
        self.next_pos = int(st["pos"][0, -1, 0]) + 1
        self.next_group = int(st["group"][0, -1]) + 1
        return self.model.norm(out.hidden_BSH)

    def feed_text(self, ids_B: list[int]) -> paddle.Tensor:
        """One text token per document (all at the same position and group)."""
        mm = self.model.cfg.multimodal
        bits, levels = max(mm.visual_bits, 1), max(mm.audio_levels, 1)
        return self.feed([text_rows([int(t)], self.next_pos, self.next_group, bits, levels) for t in ids_B])


@paddle.no_grad()
def greedy_text(model, prompts: list[dict], vocab: T.Vocab, max_new: int = 16,
                done: Optional[Callable[[list[int]], bool]] = None) -> list[list[int]]:
    """Greedy continuation of B prompts of one layout until EOS, `max_new` tokens, or `done(ids)` (a row whose
    answer is already decided stops early; it keeps being fed so the batch stays aligned, its output is frozen).
    Returns each row's generated ids (EOS not included), as `tasks.continue_text` at temperature 0 gives them."""
    s = BatchStream(model)
    h = s.feed(prompts)[:, -1]
    B = len(prompts)
    outs: list[list[int]] = [[] for _ in range(B)]
    live = np.ones(B, bool)
    for _ in range(max_new):
        logits = model.logits_from_normed(h).astype("float32").numpy()
        logits[:, vocab.text_vocab_size:] = -np.inf  # specials: the answer is text
        tok = logits.argmax(-1)
        for b in np.nonzero(live)[0]:
            if tok[b] == vocab.eos_id:
                live[b] = False
                continue
            outs[b].append(int(tok[b]))
            if done is not None and done(outs[b]):
                live[b] = False
        if not live.any():
            break
        h = s.feed_text(tok.tolist())[:, -1]
    return outs


@paddle.no_grad()
def generate_images(model, prompt_ids: list[int], count: int, vocab: T.Vocab, vision, temperature: float,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """`count` images for one prompt by next-scale prediction, side by side (`tasks.generate_image` for each, on
    the tokenizer's square latent): per scale [count, 1, h_k, w_k, d] uint8 codes."""
    scales, d = list(vision.cfg.scales), vision.cfg.bits
    L = scales[-1]
    grids = scale_schedule(scales, L, L)
    tmpl = T.document(model, [Segment("text", "input", ids=list(prompt_ids)),
                              Segment("image", "target", codes=[np.zeros((1, gh, gw, d), np.uint8) for gh, gw in grids],
                                      scale_inputs=[np.zeros((1, gh, gw, d), np.float32) for gh, gw in grids[1:]],
                                      frame_latent=np.zeros((1, L, L, d), np.float32))], vocab)
    is_vis = tmpl["modality"] == IMAGE
    first = int(np.argmax(is_vis))

    def rows(sel) -> dict:
        return {**{k: tmpl[k][sel] for k in ROW_FIELDS}, "und_table": None}

    s = BatchStream(model)
    s.feed([rows(slice(0, first))] * count)  # prompt + BOI
    codes = [np.zeros((count, 1, gh, gw, d), np.uint8) for gh, gw in grids]
    for k, (gh, gw) in enumerate(grids):
        sel = np.nonzero(is_vis & (tmpl["scale"] == k))[0]
        batch = [rows(sel) for _ in range(count)]
        if k > 0:
            nxt = vision.next_scale_inputs([paddle.to_tensor(c) for c in codes])[k - 1].numpy()
            for b in range(count):
                batch[b]["vis_in"] = batch[b]["vis_in"].copy()
                batch[b]["vis_in"][:, :d] = nxt[b].reshape(gh * gw, d)
        h = s.feed(batch)  # [count, h_k * w_k, H]
        logits = model.io.visual_logits(h.reshape([count * gh * gw, -1])).astype("float32").numpy()
        codes[k] = sample_bits(logits, temperature, rng).reshape(count, 1, gh, gw, d)
    # the frame context group and EOI would follow; nothing after the last scale changes the codes
    return codes
