"""Generation tasks on a unified model: text continuation, image -> caption, speech -> text, text -> image,
text -> speech. Each lays the document out as training did (`ernie5.data.sequence`):

- text: `prompt ...` continued with the text head until EOS;
- caption: `BOI und-tokens EOI SEP` (continuous patch-merger inputs), then text;
- asr: `BOA frames EOA SEP`, then text;
- t2i: `prompt BOI`, then scale by scale: all tokens of scale k are fed at once with `vis_in` = the tokenizer's
  `next_scale_inputs` of the codes sampled so far, and each token's d bits are read off the bitwise head (every
  token of a scale in parallel); then the frame context group (the complete latent of the sampled codes,
  `space_to_depth`), so what follows sees the finest scale; then EOI. Decoding to pixels is the vision
  tokenizer's job;
- tts: `prompt BOA`, then frame by frame: the depth heads give level 1 (END stops), its embedding is added to
  the hidden state, level 2, and so on; each frame is fed back as the next position.
Text generation never emits special tokens (their logits are masked): the outputs are text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import paddle

from ernie5.constants import IMAGE
from ernie5.data.sequence import Segment, build_document, space_to_depth
from ernie5.generation.stream import Stream, sample_bits, sample_categorical, slice_rows
from ernie5.modality.bitwise import scale_schedule


@dataclass
class Vocab:
    """What generation needs to know about the token space: text vocabulary (specials follow it) and EOS."""

    text_vocab_size: int
    eos_id: int


@dataclass
class TextOut:
    ids: list[int]  # generated ids (EOS not included)
    stopped: bool  # EOS reached (else max_new)
    logits: list[np.ndarray] = field(default_factory=list)  # per step (kept only when asked)


@dataclass
class ImageOut:
    codes: list[np.ndarray]  # per scale uint8 [1, T=1, h_k, w_k, d]
    inputs: list[np.ndarray]  # the vis_in fed per scale [s*s, 4d] (scale 0: zeros; columns d.. zero)
    logits: list[np.ndarray]  # bit logits per scale [s*s, d]
    context: np.ndarray | None = None  # the context group's vis_in [(L/2)^2, 4d], fed after the last scale


@dataclass
class SpeechOut:
    codes: np.ndarray  # [F, L]
    ended: bool  # END sampled (else max_frames)


def dims(model) -> tuple[int, int]:
    """(visual bits, audio levels) of the document arrays (1, 1 for a text-only model)."""
    mm = model.cfg.multimodal
    return (mm.visual_bits, mm.audio_levels) if mm.enabled else (1, 1)


def document(model, segments: list[Segment], vocab: Vocab) -> dict:
    return build_document(segments, vocab.text_vocab_size, *dims(model))


def continue_text(model, prompt_rows: dict, vocab: Vocab, max_new: int = 32, temperature: float = 0.0,
                  rng: Optional[np.random.Generator] = None, use_cache: bool = True,
                  keep_logits: bool = False) -> TextOut:
    """Feed `prompt_rows` (a `build_document` result) and continue with text until EOS or `max_new` tokens."""
    rng = rng or np.random.default_rng(0)
    s = Stream(model, use_cache)
    h = s.feed(prompt_rows)[-1:]
    out = TextOut([], False)
    for _ in range(max_new):
        logits = model.logits_from_normed(h)[0].astype("float32").numpy()
        if keep_logits:
            out.logits.append(logits.copy())
        logits[vocab.text_vocab_size:] = -np.inf  # specials: the answer is text
        tok = sample_categorical(logits, temperature, rng)
        if tok == vocab.eos_id:
            out.stopped = True
            break
        out.ids.append(tok)
        h = s.feed_text([tok])
    return out


def text_prompt(model, ids: list[int], vocab: Vocab) -> dict:
    return document(model, [Segment("text", "input", ids=list(ids))], vocab)


def caption_prompt(model, und_THWF: np.ndarray, vocab: Vocab) -> dict:
    """`BOI und-tokens EOI SEP` from understanding features [T, h, w, F] (`SegmentTokenizer.understanding_features`)."""
    return document(model, [Segment("image", "input", und=und_THWF), Segment("sep", "input")], vocab)


def asr_prompt(model, codes_FL: np.ndarray, vocab: Vocab) -> dict:
    """`BOA frames EOA SEP` from audio codes [F, L]."""
    return document(model, [Segment("audio", "input", audio_codes=np.asarray(codes_FL)), Segment("sep", "input")],
                    vocab)


@paddle.no_grad()
def generate_image(model, prompt_ids: list[int], vocab: Vocab, vision, temperature: float = 1.0,
                   rng: Optional[np.random.Generator] = None, use_cache: bool = True,
                   grid: Optional[tuple[int, int]] = None) -> ImageOut:
    """Text -> one image's codes by next-scale prediction. `vision`: the vision tokenizer (its scales and
    `next_scale_inputs`; the model's `num_scales` / `visual_bits` must match it). `grid`: the latent (h, w) of a
    resolution bucket (default the tokenizer's square); the token grids follow `bitwise.scale_schedule`."""
    rng = rng or np.random.default_rng(0)
    scales, d = list(vision.cfg.scales), vision.cfg.bits
    mm = model.cfg.multimodal
    if (mm.num_scales, mm.visual_bits) != (len(scales), d):
        raise ValueError(f"vision tokenizer ({len(scales)} scales, {d} bits) does not match the model "
                         f"({mm.num_scales} scales, {mm.visual_bits} bits)")
    Lh, Lw = grid if grid is not None else (scales[-1],) * 2
    if Lh % 2 or Lw % 2 or Lh < 2 or Lw < 2:
        raise ValueError(f"latent grid {Lh}x{Lw}: both sides must be even (the frame context group merges 2x2 cells)")
    grids = scale_schedule(scales, Lh, Lw)
    zeros = [np.zeros((1, 1, gh, gw, d), np.uint8) for gh, gw in grids]
    # the layout of the whole document with placeholder codes: positions and groups exactly as in training
    tmpl = document(model, [Segment("text", "input", ids=list(prompt_ids)),
                            Segment("image", "target", codes=[z[0] for z in zeros],
                                    scale_inputs=[np.zeros((1, gh, gw, d), np.float32) for gh, gw in grids[1:]],
                                    frame_latent=np.zeros((1, Lh, Lw, d), np.float32))], vocab)
    is_vis = tmpl["modality"] == IMAGE
    first = int(np.argmax(is_vis))
    stream = Stream(model, use_cache)
    stream.feed(slice_rows(tmpl, slice(0, first)))  # prompt + BOI
    codes = [z.copy() for z in zeros]
    out = ImageOut([], [], [])
    for k, (gh, gw) in enumerate(grids):
        sel = np.nonzero(is_vis & (tmpl["scale"] == k))[0]
        rows = slice_rows(tmpl, sel)
        if k > 0:
            nxt = vision.next_scale_inputs([paddle.to_tensor(c) for c in codes])[k - 1]  # depends on scales < k
            rows["vis_in"][:, :d] = nxt.numpy().reshape(gh * gw, d)
        h = stream.feed(rows)
        logits = model.io.visual_logits(h).astype("float32").numpy()  # [gh*gw, d]
        codes[k] = sample_bits(logits, temperature, rng).reshape(1, 1, gh, gw, d)
        out.inputs.append(rows["vis_in"].copy())
        out.logits.append(logits)
    ctx = np.nonzero(is_vis & (tmpl["scale"] == len(scales)))[0]  # the frame context group
    rows = slice_rows(tmpl, ctx)
    latent = vision.quantized_latent([paddle.to_tensor(c) for c in codes]).numpy()[0, :, 0]  # [d, L, L]
    rows["vis_in"] = space_to_depth(latent.transpose(1, 2, 0)).reshape(len(ctx), 4 * d).astype(np.float32)
    stream.feed(rows)
    out.context = rows["vis_in"].copy()
    stream.feed(slice_rows(tmpl, slice(int(ctx[-1]) + 1, int(ctx[-1]) + 2)))  # EOI
    out.codes = codes
    return out


@paddle.no_grad()
def sample_frame(model, h_1H: paddle.Tensor, temperature: float, rng: np.random.Generator,
                 allow_end: bool = True) -> Optional[np.ndarray]:
    """The next audio frame's L codes from the hidden state before it (depth heads, each sampled level's
    embedding added before the next); None if level 1 says END."""
    io = model.io
    codes = []
    h = h_1H
    for l, head in enumerate(io.audio_heads):
        logits = head(h)[0].astype("float32").numpy()
        if l == 0 and not allow_end:
            logits[io.codebook:] = -np.inf
        c = sample_categorical(logits, temperature, rng)
        if l == 0 and c >= io.codebook:
            return None
        codes.append(c)
        if l + 1 < io.levels:
            h = h + io.audio_level_embedding(l, paddle.to_tensor([c], dtype="int64"))
    return np.asarray(codes, np.int64)


@paddle.no_grad()
def generate_speech(model, prompt_ids: list[int], vocab: Vocab, temperature: float = 1.0,
                    rng: Optional[np.random.Generator] = None, max_frames: int = 100, min_frames: int = 1,
                    use_cache: bool = True) -> SpeechOut:
    """Text -> audio codes [F, L], frame by frame until END (level 1) or `max_frames`."""
    rng = rng or np.random.default_rng(0)
    L = model.cfg.multimodal.audio_levels
    tmpl = document(model, [Segment("text", "input", ids=list(prompt_ids)),
                            Segment("audio", "target", audio_codes=np.zeros((0, L), np.int64))], vocab)
    stream = Stream(model, use_cache)
    h = stream.feed(slice_rows(tmpl, slice(0, len(tmpl["token"]) - 1)))[-1:]  # prompt + BOA (not EOA)
    frames, ended = [], False
    while len(frames) < max_frames:
        c = sample_frame(model, h, temperature, rng, allow_end=len(frames) >= min_frames)
        if c is None:
            ended = True
            break
        frames.append(c)
        h = stream.feed_audio_frame(c)
    codes = np.stack(frames) if frames else np.zeros((0, L), np.int64)
    return SpeechOut(codes, ended)
