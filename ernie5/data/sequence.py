"""Unified multimodal sequence format: segments -> per-position arrays -> packed rows -> attention masks.

A document is a list of `Segment`s (text / image / video / audio / sep), each an understanding *input* or a
generation *target*. Layouts: image `BOI S1 S2 ... EOI`, video `BOV F1S1 F1S2 ... F2S1 ... EOV`,
audio `BOA frame1 ... EOA`; `SEP` separates an understanding input from what follows.

Special tokens sit at a **fixed offset after the text vocabulary**: id = text_vocab_size + index in `SPECIALS`
(the sentencepiece model is not retrained; the backbone's embedding has text_vocab_size + len(SPECIALS) rows).

Per position (n positions in a document, `FIELDS` below):
- `token` int32: text / special id; visual: the token's d bits packed into an int (bit i = channel i, see
  `bitwise.bits_to_ids`); audio: the level-1 code.  `audio` int16 [n, L]: all L codes of an audio frame (-1 else).
- `vis_in` float32 [n, 4d] (`vis_width(d)`): visual *inputs*. A scale position uses the first d columns (teacher
  forcing of next-scale prediction: the accumulated latent of earlier scales of the same frame on this scale's
  grid; zeros at scale 0). Visual tokens are predicted from these, so a visual position's target is its **own**
  code; text and audio targets are the **next** position's.
- **Frame context group** (visible history): the scales' inputs never contain the finest scale's codes (they are
  what the last scale predicts), so after the last scale of every frame comes one more group, scale index K
  (= number of scales), of (L/2)^2 input-only positions carrying the frame's *complete* reconstructed latent
  (all K scales, `Segment.frame_latent`), 2x2 latent cells per position (`space_to_depth`: all 4d columns), at
  the 2x2 cell centres. Later frames and everything after the image or video attend to the whole frame through
  it; it has no target (nothing predicts it: generation computes it from the sampled codes).
- `modality` int8 (0 text/special, 1 image, 2 video, 3 audio, -1 padding), `scale`, `frame` int16 (-1 if none).
- `pos` float32 [n, 3] Uni-RoPE (t, h, w): text/audio t = h = w = index; visual t = start + frame,
  (h, w) = start + cell centre on the finest latent grid, so every scale is centre-aligned
  ((i + 0.5) * L / s - 0.5: a 1x1 scale sits at the middle of the frame). After a visual segment the index
  resumes at start + max(T, L).
- `group` int32: one per text token, one per visual (frame, scale), one per audio frame. Attention: query i sees
  key j iff same document and group[j] <= group[i] (causal across groups, bidirectional inside one).
- `target` int32 (-1: none), `target_audio` int16 [n, L], `loss_mask` uint8 [n, 3] (text, visual, audio head).
- `und_index` int32: row of `und_table` (float32 [m, UND_PATCHES = 16, F]) for a visual **understanding** token,
  -1 else. An image or video given as an understanding *input* with continuous features (`Segment.und`,
  [T, h, w, F] on the latent grid) is not laid out as bit codes; its tokens hold the patch merger's inputs:
  an image becomes (h/2) x (w/2) tokens of K = 4 feature vectors (its 2x2 latent cells; rows 4..15 zero), one
  group, positions at the 2x2 cell centres; a video is cut into chunks of 4 frames (the last frame repeated to
  fill the last chunk) and each chunk becomes (h/2) x (w/2) tokens of K = 16 vectors (2x2 cells x 4 frames, order
  [frame, row, column]), one group per chunk, t at the chunk's middle (start + 4c + 1.5). The model knows K from
  the modality. Packed splits keep one `und_table` for the whole split (indices are split-global).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ernie5.constants import AUDIO, IMAGE, PAD, TEXT, VIDEO
from ernie5.model import mask
SPECIALS = ["<boi>", "<eoi>", "<bov>", "<eov>", "<boa>", "<eoa>", "<sep>"]
HEAD_TEXT, HEAD_VISUAL, HEAD_AUDIO = 0, 1, 2
CONTEXT = "context"  # role of a frame context group's positions (input only)


def vis_width(bits: int) -> int:
    """Columns of `vis_in`: a context position holds 2x2 latent cells of d channels."""
    return 4 * bits


def space_to_depth(latent_hwd: np.ndarray) -> np.ndarray:
    """[h, w, d] -> [h/2, w/2, 4d]: cell (i, j) holds latent cells (2i + a, 2j + b), a, b in {0, 1}, in that order
    (column (2a + b) * d + c is channel c of cell (2i + a, 2j + b))."""
    h, w, d = latent_hwd.shape
    if h % 2 or w % 2:
        raise ValueError(f"the frame context group needs an even latent grid, got {h}x{w}")
    return latent_hwd.reshape(h // 2, 2, w // 2, 2, d).transpose(0, 2, 1, 3, 4).reshape(h // 2, w // 2, 4 * d)


def special_ids(text_vocab_size: int) -> dict[str, int]:
    return {name: text_vocab_size + i for i, name in enumerate(SPECIALS)}


@dataclass
class Segment:
    """One piece of a document. text: `ids`; image/video: `codes` (list over scales of uint8 [T, s, s, d]),
    `scale_inputs` (list over scales 1.. of float [T, s, s, d]) and `frame_latent` (float [T, L, L, d], each
    frame's latent reconstructed from all its scales: the input of its context group); audio: `audio_codes`
    int [F, L]."""

    kind: str
    role: str = "target"  # "input" (understanding, no loss) or "target" (generation)
    ids: list[int] = field(default_factory=list)
    codes: list[np.ndarray] = field(default_factory=list)
    scale_inputs: list[np.ndarray] = field(default_factory=list)
    frame_latent: np.ndarray | None = None
    audio_codes: np.ndarray | None = None
    und: np.ndarray | None = None  # understanding features [T, h, w, F] (used when role == "input")
    meta: dict | None = None  # image / video: how the picture was fitted (bucket, crop box, scale schedule)


class _Doc:
    """Accumulates positions of one document."""

    def __init__(self, bits: int, levels: int):
        self.bits, self.levels = bits, levels
        self.rows: list[dict] = []
        self.p = 0  # next RoPE index
        self.g = 0  # next group id

    def add(self, token, modality, pos, role, audio=None, vis_in=None, scale=-1, frame=-1, new_group=True, und=None):
        if new_group:
            self.g += 1
        self.rows.append({"token": token, "modality": modality, "pos": pos, "group": self.g - 1, "role": role,
                          "audio": audio, "vis_in": vis_in, "scale": scale, "frame": frame, "und": und})

    def text(self, token, role):
        self.add(token, TEXT, (self.p,) * 3, role)
        self.p += 1


def _pack_bits(bits_d: np.ndarray) -> np.ndarray:
    return (bits_d.astype(np.int64) << np.arange(bits_d.shape[-1])).sum(-1)


def build_document(segments: list[Segment], text_vocab_size: int, bits: int = 1, levels: int = 1) -> dict:
    """Positions of one document as arrays (see the module docstring)."""
    sp = special_ids(text_vocab_size)
    doc = _Doc(bits, levels)
    for seg in segments:
        if seg.kind == "text":
            for t in seg.ids:
                doc.text(t, seg.role)
        elif seg.kind == "sep":
            doc.text(sp["<sep>"], seg.role)
        elif seg.kind in ("image", "video") and seg.role == "input" and seg.und is not None:
            _understanding(doc, seg, sp)
        elif seg.kind in ("image", "video"):
            _visual(doc, seg, sp)
        elif seg.kind == "audio":
            doc.text(sp["<boa>"], seg.role)
            for f, codes_L in enumerate(np.asarray(seg.audio_codes)):
                doc.add(int(codes_L[0]), AUDIO, (doc.p,) * 3, seg.role, audio=codes_L, frame=f)
                doc.p += 1
            doc.text(sp["<eoa>"], seg.role)
        else:
            raise ValueError(f"unknown segment kind {seg.kind!r}")
    return _arrays(doc.rows, bits, levels)


def _centres(n: int, L: int) -> np.ndarray:
    """Centres of n cells spread over L latent cells: (i + 0.5) * L / n - 0.5 (a 1-cell grid sits in the middle)."""
    return (np.arange(n) + 0.5) * L / n - 0.5


def _visual(doc: _Doc, seg: Segment, sp: dict) -> None:
    video = seg.kind == "video"
    doc.text(sp["<bov>" if video else "<boi>"], seg.role)
    T, Lh, Lw = seg.codes[-1].shape[:3]  # the latent grid (a resolution bucket: Lh x Lw)
    if seg.frame_latent is None or np.shape(seg.frame_latent)[:3] != (T, Lh, Lw):
        raise ValueError(f"a visual segment needs frame_latent [T={T}, {Lh}, {Lw}, d], got "
                         f"{None if seg.frame_latent is None else np.shape(seg.frame_latent)}")
    start = doc.p
    K = len(seg.codes)
    mod = VIDEO if video else IMAGE
    for f in range(T):
        for k, codes in enumerate(seg.codes):
            sh, sw = codes.shape[1:3]
            ch, cw = _centres(sh, Lh), _centres(sw, Lw)
            ids = _pack_bits(codes[f])  # [sh, sw]
            inp = seg.scale_inputs[k - 1][f] if k > 0 else np.zeros((sh, sw, codes.shape[-1]), np.float32)
            for i in range(sh):
                for j in range(sw):
                    doc.add(int(ids[i, j]), mod, (start + f, start + ch[i], start + cw[j]), seg.role,
                            vis_in=inp[i, j], scale=k, frame=f, new_group=(i == 0 and j == 0))
        ctx = space_to_depth(np.asarray(seg.frame_latent[f], np.float32))  # the complete frame, 2x2 cells each
        for i in range(Lh // 2):
            for j in range(Lw // 2):
                doc.add(0, mod, (start + f, start + 2 * i + 0.5, start + 2 * j + 0.5), CONTEXT, vis_in=ctx[i, j],
                        scale=K, frame=f, new_group=(i == 0 and j == 0))
    doc.p = start + max(T, Lh, Lw)
    doc.text(sp["<eov>" if video else "<eoi>"], seg.role)


UND_PATCHES = 16  # rows of an understanding token's features: 2x2 patches x 4 frames (video); images use 4
UND_FRAMES = 4  # frames merged into one video understanding token


def _understanding(doc: _Doc, seg: Segment, sp: dict) -> None:
    """Continuous understanding tokens: one per 2x2 block of latent cells, of one frame (image, K = 4) or of a
    chunk of 4 frames (video, K = 16)."""
    video = seg.kind == "video"
    feats = np.asarray(seg.und, np.float32)  # [T, Lh, Lw, F]
    T, Lh, Lw, F = feats.shape
    if Lh % 2 or Lw % 2:
        raise ValueError(f"understanding features need an even latent grid, got {Lh}x{Lw}")
    sh, sw = Lh // 2, Lw // 2
    ch, cw = _centres(sh, Lh), _centres(sw, Lw)
    doc.text(sp["<bov>" if video else "<boi>"], seg.role)
    start = doc.p
    if video:
        chunks = -(-T // UND_FRAMES)
        idx = np.minimum(np.arange(chunks * UND_FRAMES), T - 1)  # the last frame repeated to fill the last chunk
        feats = feats[idx].reshape(chunks, UND_FRAMES, Lh, Lw, F)
    else:
        chunks = T
        feats = feats[:, None]  # [T, 1, Lh, Lw, F]
    for c in range(chunks):
        t = start + (c * UND_FRAMES + (UND_FRAMES - 1) / 2 if video else c)
        for i in range(sh):
            for j in range(sw):
                block = feats[c, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(-1, F)  # [K, F]: frame, row, column
                padded = np.zeros((UND_PATCHES, F), np.float32)
                padded[:len(block)] = block
                doc.add(0, VIDEO if video else IMAGE, (t, start + ch[i], start + cw[j]), seg.role,
                        frame=c * UND_FRAMES if video else c, new_group=(i == 0 and j == 0), und=padded)
    doc.p = start + max(chunks * UND_FRAMES if video else T, Lh, Lw)  # past the last chunk's t
    doc.text(sp["<eov>" if video else "<eoi>"], seg.role)


def _arrays(rows: list[dict], bits: int, levels: int) -> dict:
    n = len(rows)
    out = {"token": np.array([r["token"] for r in rows], np.int32),
           "modality": np.array([r["modality"] for r in rows], np.int8),
           "pos": np.array([r["pos"] for r in rows], np.float32).reshape(n, 3),
           "group": np.array([r["group"] for r in rows], np.int32),
           "scale": np.array([r["scale"] for r in rows], np.int16),
           "frame": np.array([r["frame"] for r in rows], np.int16),
           "audio": np.full((n, levels), -1, np.int16), "vis_in": np.zeros((n, vis_width(bits)), np.float32),
           "target": np.full(n, -1, np.int32), "target_audio": np.full((n, levels), -1, np.int16),
           "loss_mask": np.zeros((n, 3), np.uint8), "und_index": np.full(n, -1, np.int32)}
    und = [r["und"] for r in rows if r["und"] is not None]
    out["und_table"] = np.stack(und).astype(np.float32) if und else None
    k = 0
    for i, r in enumerate(rows):
        if r["und"] is not None:
            out["und_index"][i] = k
            k += 1
    for i, r in enumerate(rows):
        if r["audio"] is not None:
            out["audio"][i] = r["audio"]
        if r["vis_in"] is not None:
            out["vis_in"][i, :len(r["vis_in"])] = r["vis_in"]
    for i, r in enumerate(rows):
        if r["und"] is not None or r["role"] == CONTEXT:
            continue  # understanding and context positions have no target; a text position before one predicts nothing
        if r["modality"] in (IMAGE, VIDEO):  # next-scale prediction: a visual position predicts its own code
            out["target"][i] = r["token"]
            out["loss_mask"][i, HEAD_VISUAL] = r["role"] == "target"
            continue
        if i + 1 >= n:
            continue
        nxt = rows[i + 1]
        if nxt["modality"] == TEXT:
            out["target"][i] = nxt["token"]
            out["loss_mask"][i, HEAD_TEXT] = nxt["role"] == "target"
        elif nxt["modality"] == AUDIO:
            out["target"][i] = nxt["token"]
            out["target_audio"][i] = nxt["audio"]
            out["loss_mask"][i, HEAD_AUDIO] = nxt["role"] == "target"
        # a position followed by a visual one has no target: visual tokens come from their own group's inputs
    return out


FIELDS = ("token", "modality", "pos", "group", "scale", "frame", "audio", "vis_in", "target", "target_audio",
          "loss_mask", "und_index")


def pack_documents(docs: list[dict], seq_len: int) -> tuple[dict, int]:
    """Greedy packing in order into rows of `seq_len`; adds `doc` (per-row document index) and makes `group`
    row-global (increasing). Documents longer than a row are dropped (returned count). Padding positions are
    modality -1, each its own document and group. Understanding features of all rows go to one `und_table`
    [M, K, F] (None when there are none) and `und_index` points into it."""
    rows, cur, used, dropped = [], [], 0, 0
    for d in docs:
        n = len(d["token"])
        if n > seq_len:
            dropped += 1
            continue
        if used + n > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(d)
        used += n
    if cur:
        rows.append(cur)
    packed = {k: [] for k in FIELDS + ("doc",)}
    tables, m = [], 0
    for row in rows:
        r = _pack_row(row, seq_len)
        for d in row:  # split-global understanding table: shift each document's indices past the earlier ones
            if d.get("und_table") is not None:
                tables.append(d["und_table"])
        r["und_index"] = np.where(r["und_index"] >= 0, r["und_index"] + m, -1).astype(np.int32)
        m += sum(len(d["und_table"]) for d in row if d.get("und_table") is not None)
        for k in packed:
            packed[k].append(r[k])
    out = {k: np.stack(v) if v else np.zeros((0, seq_len)) for k, v in packed.items()}
    out["und_table"] = np.concatenate(tables) if tables else None
    return out, dropped


def _pack_row(docs: list[dict], seq_len: int) -> dict:
    parts = {k: [] for k in FIELDS + ("doc",)}
    g0 = 0
    u0 = 0
    for di, d in enumerate(docs):
        for k in FIELDS:
            if k == "group":
                parts[k].append(d["group"] + g0)
            elif k == "und_index":  # row-local here; pack_documents makes it split-global
                parts[k].append(np.where(d[k] >= 0, d[k] + u0, -1).astype(np.int32))
            else:
                parts[k].append(d[k])
        u0 += len(d["und_table"]) if d.get("und_table") is not None else 0
        parts["doc"].append(np.full(len(d["token"]), di, np.int32))
        g0 += int(d["group"].max()) + 1 if len(d["group"]) else 0
    n_pad = seq_len - sum(len(d["token"]) for d in docs)
    if n_pad:
        ref = docs[0]
        for k in FIELDS:
            shape = (n_pad,) + ref[k].shape[1:]
            fill = {"modality": PAD, "target": -1, "target_audio": -1, "audio": -1, "scale": -1, "frame": -1,
                    "und_index": -1}
            parts[k].append(np.full(shape, fill.get(k, 0), ref[k].dtype))
        parts["group"][-1] = np.arange(g0, g0 + n_pad, dtype=np.int32)
        parts["doc"].append(np.arange(len(docs), len(docs) + n_pad, dtype=np.int32))
    return {k: np.concatenate(v) for k, v in parts.items()}


def text_row(tokens_R: np.ndarray, docs_R: np.ndarray, bits: int, levels: int) -> dict:
    """A packed text row (R = S + 1 tokens and their document ids, as `PackedLoader` cuts them) in the unified
    row layout of `pack_documents` (S positions, `FIELDS` + `doc`): what `build_document` gives for its text
    pieces, one group per token, positions restarting at each document, and the last position's target the
    row's extra token when it continues the same document. Lets text sources blend with multimodal ones."""
    tokens_R, docs_R = np.asarray(tokens_R), np.asarray(docs_R)
    S = len(tokens_R) - 1
    doc_S = np.unique(docs_R[:S], return_inverse=True)[1].astype(np.int32)
    first = np.searchsorted(doc_S, doc_S, side="left")  # doc ids are non-decreasing along a row
    same_next = docs_R[1:] == docs_R[:S]
    target = np.where(same_next, tokens_R[1:], -1).astype(np.int32)
    loss_mask = np.zeros((S, 3), np.uint8)
    loss_mask[:, HEAD_TEXT] = same_next
    return {"token": tokens_R[:S].astype(np.int32), "modality": np.full(S, TEXT, np.int8),
            "pos": np.repeat((np.arange(S) - first).astype(np.float32)[:, None], 3, axis=1),
            "group": np.arange(S, dtype=np.int32), "scale": np.full(S, -1, np.int16),
            "frame": np.full(S, -1, np.int16), "audio": np.full((S, levels), -1, np.int16),
            "vis_in": np.zeros((S, vis_width(bits)), np.float32), "target": target,
            "target_audio": np.full((S, levels), -1, np.int16), "loss_mask": loss_mask,
            "und_index": np.full(S, -1, np.int32), "doc": doc_S}


# -- attention ----------------------------------------------------------------------------------------------------
def frame_until(doc_BS: np.ndarray, group_BS: np.ndarray, frame_BS: np.ndarray, scale_BS: np.ndarray,
                modality_BS: np.ndarray, window: int = 0, hide_B=None) -> np.ndarray:
    """`until` int64 [B, S] of the video recipe (`ernie5.model.mask`: a key is hidden from queries whose group is
    >= its until; `mask.NEVER` everywhere else):
    - **windowed temporal attention** (`window` W >= 1): the positions of frame f of a generated video (its scales
      and its context group) are visible up to the last position before frame f + W, so a frame attends to
      itself and the W - 1 frames before it, and whatever follows the video to its last W frames: long videos
      cost a bounded attention span per frame (a KV cache could drop expired frames; `KVCache` keeps them and
      masks them). W = 0: every earlier frame stays visible. Training applies it (`make_unified_batch`); the
      generation tasks produce no video, and `Stream` does not apply a window.
    - **old-frame masking** (training): `hide_B[b]` (bool [frames] per video segment, in order) hides frame f
      from frame f + 2 on (its own and the next frame still see it): later frames must do without it, as when
      older frames leave the window or are dropped.
    A generated video is a run of positions with modality VIDEO and a scale (>= 0) in one document; continuous
    understanding inputs (no scale) are left alone. `hide_B[b]` lists one bool array per such run of row b."""
    from ernie5.model.mask import NEVER

    B, S = doc_BS.shape
    until = np.full((B, S), NEVER, np.int64)
    for b in range(B):
        hides = list(hide_B[b]) if hide_B is not None else []
        for n, (lo, hi) in enumerate(video_runs(doc_BS[b], scale_BS[b], modality_BS[b])):
            fr = frame_BS[b, lo:hi]
            T = int(fr.max()) + 1
            first = np.array([group_BS[b, lo + int(np.argmax(fr == f))] for f in range(T)], np.int64)
            limit = np.full(T, NEVER, np.int64)
            if window:
                limit[:max(T - window, 0)] = first[window:]
            if n < len(hides):
                hidden = np.asarray(hides[n][:T], bool)
                limit[:T - 2] = np.where(hidden[:T - 2], np.minimum(limit[:T - 2], first[2:]), limit[:T - 2])
            until[b, lo:hi] = limit[fr]
    return until


def video_runs(doc_S: np.ndarray, scale_S: np.ndarray, modality_S: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) runs of generated-video positions (modality VIDEO with a scale) inside one document."""
    is_vid = (modality_S == VIDEO) & (scale_S >= 0)
    runs, i, S = [], 0, len(doc_S)
    while i < S:
        if not is_vid[i]:
            i += 1
            continue
        j = i
        while j < S and is_vid[j] and doc_S[j] == doc_S[i]:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def allowed_mask(doc_BS: np.ndarray, group_BS: np.ndarray, until_BS: np.ndarray | None = None) -> np.ndarray:
    """bool [B, S, S]: query i may attend key j (the rule of `ernie5.model.mask`: same document,
    group[j] <= group[i] < until[j])."""
    return mask.allowed(doc_BS, group_BS, doc_BS, group_BS, until_BS)


def dense_mask(doc_BS: np.ndarray, group_BS: np.ndarray, until_BS: np.ndarray | None = None) -> np.ndarray:
    """Additive float32 [B, 1, S, S] (0 allowed, -inf masked): what the CPU attention (`attn_mask`) takes."""
    return mask.additive(allowed_mask(doc_BS, group_BS, until_BS))


def flashmask_ranges(doc_BS: np.ndarray, group_BS: np.ndarray, until_BS: np.ndarray | None = None) -> np.ndarray:
    """FlashMask `startend_row_indices` [B, 1, S, 2] int32 for `flashmask_attention(..., causal=False)`:
    per key column j, rows >= LTS are masked, LTS = the end of j's document or, if earlier, the first row whose
    group reaches until[j] (later documents, expired frames), and rows < UTE = first row of j's group are masked
    (earlier groups and documents). Needs groups non-decreasing along the row, contiguous documents and groups,
    which `pack_documents` guarantees."""
    B, S = doc_BS.shape
    out = np.zeros((B, 1, S, 2), np.int32)
    for b in range(B):
        doc, grp = doc_BS[b], group_BS[b]
        doc_change = np.nonzero(np.diff(doc))[0] + 1
        doc_end = np.searchsorted(np.append(doc_change, S), np.arange(S), side="right")
        lts = np.append(doc_change, S)[doc_end]
        if until_BS is not None:
            lts = np.minimum(lts, np.searchsorted(grp, until_BS[b], side="left"))
        out[b, 0, :, 0] = lts
        out[b, 0, :, 1] = np.searchsorted(grp, grp, side="left")  # grp is sorted: first index of each value
    return out


def expand_flashmask(ranges_B1S2: np.ndarray) -> np.ndarray:
    """bool allowed [B, S, S] from FlashMask ranges (the kernel's documented semantics, causal=False)."""
    B, _, S, _ = ranges_B1S2.shape
    rows = np.arange(S)[None, :, None]
    lts = ranges_B1S2[:, 0, None, :, 0]
    ute = ranges_B1S2[:, 0, None, :, 1]
    return ~((rows >= lts) | (rows < ute))
