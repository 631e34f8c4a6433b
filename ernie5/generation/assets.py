"""A checkpoint with its tokenizers, and `ernie5 generate`.

Tokenizer paths come from the multimodal shards' meta.json named by the checkpoint's config (`data.dir`): the
same text / vision / audio tokenizers the training data was made with. A text-only checkpoint (text shards)
uses its config's `tokenizer.model_path` and can only do `--task text`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ernie5.constants import MULTIMODAL_FORMAT
from ernie5.errors import UserError

TASKS = ("text", "caption", "asr", "t2i", "tts")
DEFAULT_TEMPERATURE = {"text": 0.0, "caption": 0.0, "asr": 0.0, "t2i": 1.0, "tts": 1.0}
DEFAULT_MAX_NEW = {"text": 64, "caption": 16, "asr": 16, "t2i": 0, "tts": 100}  # tts: frames


@dataclass
class Generator:
    """A loaded checkpoint ready to generate: model (eval), config, tokenizers, vocabulary facts."""

    model: object
    cfg: object
    ckpt: Path
    text: object  # TextTokenizer
    segments: Optional[object]  # SegmentTokenizer (multimodal checkpoints): .vision, .audio, media readers
    vocab: object  # tasks.Vocab
    meta: Optional[dict]

    @property
    def vision(self):
        return self.segments.vision

    @property
    def audio(self):
        return self.segments.audio

    def need_multimodal(self, task: str) -> None:
        if self.segments is None or self.model.io is None:
            raise UserError(f"--task {task}", f"needs a multimodal checkpoint ({self.ckpt} is text-only)")


def shard_meta(cfg) -> Optional[dict]:
    """meta.json of the checkpoint's multimodal shards (its data.dir, or the first multimodal source of its
    data.sources); None for a text-only model (which needs only its config's tokenizer). A multimodal model
    without its shards' meta.json is an error."""
    mm = [s for s in cfg.data.sources if s.is_multimodal]
    path = Path(mm[0].paths[0] if mm else cfg.data.dir) / "meta.json"
    if not path.is_file():
        if not cfg.model.multimodal.enabled:
            return None
        raise UserError(str(path), "shard meta.json not found: generation reads the tokenizer paths from the "
                                   "checkpoint's data.dir (point it elsewhere with data.dir=DIR)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(str(path), f"unreadable ({e})") from None
    if meta.get("format") != MULTIMODAL_FORMAT:
        if cfg.model.multimodal.enabled:
            raise UserError(str(path), "not a multimodal shard, but the checkpoint's model is multimodal")
        return None
    return meta


def load_generator(ckpt_path: str, overrides: list[str] = ()) -> Generator:
    """Model of a checkpoint (or a run dir's newest) plus the tokenizers its data was made with."""
    from ernie5.runconfig import load_config
    from ernie5.data.media_tokenize import SegmentTokenizer
    from ernie5.generation.tasks import Vocab
    from ernie5.modality.text_tokenizer import TextTokenizer
    from ernie5.train.checkpoint import build_model_from_checkpoint, resolve_checkpoint

    ckpt = resolve_checkpoint(ckpt_path)
    cfg = load_config(ckpt / "config.yaml", list(overrides))
    meta = shard_meta(cfg)
    if meta is not None:
        for key in ("text_tokenizer", "vision_tokenizer", "audio_tokenizer"):
            if not Path(meta[key]).is_file():
                raise UserError(meta[key], f"{key.replace('_', ' ')} named in the shards' meta.json not found")
        segments = SegmentTokenizer(meta["text_tokenizer"], meta["vision_tokenizer"], meta["audio_tokenizer"], Path("."))
        text = segments.text
        vocab = Vocab(int(meta["text_vocab_size"]), int(meta["eos_id"]))
    else:
        segments = None
        text = TextTokenizer(cfg.tokenizer.model_path)
        vocab = Vocab(text.vocab_size, text.eos_id)
    model = build_model_from_checkpoint(ckpt, cfg)
    return Generator(model, cfg, ckpt, text, segments, vocab, meta)


# -- media out ------------------------------------------------------------------------------------------------
def save_png(pixels_HW: np.ndarray, path: str) -> Path:
    """Pixels in [-1, 1] -> 8-bit grayscale PNG."""
    from PIL import Image

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(((np.clip(pixels_HW, -1, 1) + 1) * 127.5).round().astype(np.uint8)).save(out)
    return out


def save_wav(wav_T: np.ndarray, sample_rate: int, path: str) -> Path:
    from ernie5.data.digits_world import write_wav

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_wav(out, np.asarray(wav_T, np.float32), sample_rate)
    return out


def decode_image(vision, codes: list[np.ndarray]) -> np.ndarray:
    """Codes (per scale [1, 1, s, s, d]) -> pixels [H, W] in [-1, 1] (first channel)."""
    import paddle

    with paddle.no_grad():
        px = vision.decode([paddle.to_tensor(c) for c in codes]).numpy()
    return px[0, 0, 0]


def decode_speech(audio, codes_FL: np.ndarray) -> np.ndarray:
    import paddle

    if len(codes_FL) == 0:
        return np.zeros(0, np.float32)
    with paddle.no_grad():
        return audio.decode(paddle.to_tensor(codes_FL[None].astype(np.int64))).numpy()[0]


# -- the CLI verb ---------------------------------------------------------------------------------------------
def run_generate(ckpt: str, task: str, prompt: Optional[str] = None, input_path: Optional[str] = None,
                 out: Optional[str] = None, max_new: Optional[int] = None, temperature: Optional[float] = None,
                 seed: int = 0, overrides: list[str] = (), log=print) -> dict:
    """`ernie5 generate`: prints the text (text / caption / asr) or writes the PNG (t2i) / WAV (tts)."""
    from ernie5.generation import tasks as T

    if task not in TASKS:
        raise UserError("--task", f"{task!r} is not one of {', '.join(TASKS)}")
    needs_input = task in ("caption", "asr")
    if needs_input and not input_path:
        raise UserError("--input", f"--task {task} needs --input ({'an image' if task == 'caption' else 'a WAV'})")
    if not needs_input and prompt is None:
        raise UserError("--prompt", f"--task {task} needs --prompt TEXT")
    if input_path and not Path(input_path).is_file():
        raise UserError(input_path, "input file not found")
    temp = DEFAULT_TEMPERATURE[task] if temperature is None else temperature
    n = DEFAULT_MAX_NEW[task] if max_new is None else max_new
    g = load_generator(ckpt, list(overrides))
    if task != "text":
        g.need_multimodal(task)
    rng = np.random.default_rng(seed)
    m, v = g.model, g.vocab
    if task in ("text", "caption", "asr"):
        prompt_ids = g.text.encode(prompt) if task == "text" else []
        if task == "text":
            rows = T.text_prompt(m, prompt_ids, v)
        elif task == "caption":
            seg = g.segments({"kind": "image", "path": str(Path(input_path).resolve()), "role": "input"})
            rows = T.caption_prompt(m, seg.und, v)
        else:
            seg = g.segments({"kind": "audio", "path": str(Path(input_path).resolve()), "role": "input"})
            rows = T.asr_prompt(m, seg.audio_codes, v)
        res = T.continue_text(m, rows, v, max_new=n, temperature=temp, rng=rng)
        text = g.text.decode(res.ids)
        log(g.text.decode(prompt_ids + res.ids) if task == "text" else text)
        return {"task": task, "text": text, "ids": res.ids, "stopped_at_eos": res.stopped}
    ids = g.text.encode(prompt)
    if task == "t2i":
        res = T.generate_image(m, ids, v, g.vision, temperature=temp, rng=rng)
        path = save_png(decode_image(g.vision, res.codes), out or "generated.png")
        log(f"wrote {path}")
        return {"task": task, "path": str(path)}
    res = T.generate_speech(m, ids, v, temperature=temp, rng=rng, max_frames=n)
    wav = decode_speech(g.audio, res.codes)
    path = save_wav(wav, g.audio.cfg.sample_rate, out or "generated.wav")
    how = "END" if res.ended else f"the {n}-frame limit"
    log(f"wrote {path} ({len(res.codes)} frames, {len(wav) / g.audio.cfg.sample_rate:.2f} s, stopped at {how})")
    if len(res.codes) == 0:
        print("warning: no audio frames generated", file=sys.stderr)
    return {"task": task, "path": str(path), "frames": int(len(res.codes)), "ended": res.ended}
