""""Digits world": one small concept set (the digits 0-9) in every modality, built from installed packages only.

- images: scikit-learn's 1797 real 8x8 handwritten digits, upsampled to `image_size` (PNG files);
- videos: a digit moving across the frame, `frames` frames (uint8 .npy files [T, H, W]);
- speech: digit words and short sentences synthesised with espeak-ng (`ernie5.data.speech`), 16 kHz WAV: six
  voices, each at three speaking rates and two pitches (`TRAIN_SPEECH`), 1080 recordings;
- captions: English and Chinese ("a handwritten seven", "手写的数字七").

Documents go both ways for every item: image -> caption (understanding) and caption -> image (generation),
speech -> text and text -> speech. Caption -> image prompts alternate English / Chinese; every image gets an
image -> caption document in each language. The mix is set for the understanding tasks: a caption or transcript
names its digit in one or two tokens (everything else in it is predictable without looking), so a step sees few
informative understanding targets; two captions per image and two recordings per phrase double them and give
speech -> text more than one recording per voice and rate to learn from (with one, a tiny model recognised its
training clips and little else). Only the first `num_images` digit images enter documents (held-out: index %
10 == 9); the remaining ones are never seen in training: `eval_image_indices()` is what the cross-modal scores use.

`fetch_digits_world(out)` writes the media, packed arrays for tokenizer training (`images.npy`, `labels.npy`,
`videos.npy`, `audio.npy` + `audio_index.json`) and `samples.jsonl`: one document per line, a list of segments
that `ernie5 data prepare` turns into the unified token stream. Held-out = every item whose index % 10 == 9.

Evaluation-only speech (`eval_audio/` + `eval_audio_index.json`, `EVAL_SPEECH`): 600 more recordings of the same
phrases, made only for the speech -> text score and never in a document or in the audio tokenizer's arrays: the
six training voices at speaking rates and pitches no training clip uses (360), and eight voices no training clip
uses (240).
"""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np

from ernie5.data.npy import read_npy
from ernie5.errors import UserError

WORDS_EN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WORDS_ZH = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"]
VOICES = [("en", 150, 45), ("en", 185, 60), ("en-us", 165, 40), ("en+f3", 170, 55), ("en+m3", 160, 50),
          ("en-gb-x-rp", 175, 65)]


NUM_DOC_IMAGES = 1200  # digit images 0..1199 enter documents; 1200..1796 stay unseen for evaluation
RATES = (0.85, 1.0, 1.15)  # speaking-rate multipliers: more speech variety from the same voices
# training recordings per voice: (rate multiplier, pitch shift); each voice at three rates, once at its own pitch
# and once shifted (two recordings of every phrase per voice and rate: speech -> text needs the variety)
TRAIN_SPEECH = tuple((m, 0) for m in RATES) + ((0.85, 15), (1.0, -15), (1.15, 15))
# evaluation-only speech settings (voice, rate, pitch): every training voice at two unseen rate / pitch settings
# (rate x 0.92 pitch - 10, rate x 1.08 pitch + 10; training uses rate x 0.85 / 1.0 / 1.15, `TRAIN_SPEECH`), then
# eight voices (espeak-ng variants and accents) that no training clip uses
EVAL_SPEECH = [(v, int(r * m), p + dp, "known voice") for v, r, p in VOICES for m, dp in ((0.92, -10), (1.08, 10))] + \
    [(v, r, p, "new voice") for v, r, p in (("en+f2", 165, 55), ("en+m2", 160, 45), ("en-us+f4", 175, 60),
                                           ("en-GB-scotland", 165, 50), ("en-029", 170, 50), ("en-us-nyc", 160, 45),
                                           ("en+m4", 150, 40), ("en-GB-x-gbclan", 180, 55))]


def is_heldout(index: int) -> bool:
    return index % 10 == 9


def is_heldout_clip(index: int) -> bool:
    """Held-out speech clips: a fixed pseudo-random 10% (clip order runs voice -> setting -> digit -> phrase, so
    `index % 10` would hold out the same three phrases in every voice). Each held-out recording's phrase is heard
    in training from other voices / rates: the score measures recognising new recordings."""
    return (index * 2654435761 % 2 ** 32) % 10 == 9


def eval_image_indices(num_images: int = NUM_DOC_IMAGES) -> range:
    """Digit images never used in any document (unseen by tokenizer-free training and by the model)."""
    return range(num_images, 1797)


def caption_en(d: int) -> str:
    return f"a handwritten {WORDS_EN[d]}"


def caption_zh(d: int) -> str:
    return f"手写的数字{WORDS_ZH[d]}"


def digit_images(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits upsampled (bicubic) to size x size: uint8 [N, size, size] (ink bright), labels [N]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("scikit-learn", "not installed (pip install -e .[demo]); it ships the digit images") from None
    from PIL import Image

    d = load_digits()
    imgs = (d.images / 16.0 * 255).clip(0, 255).astype(np.uint8)
    up = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in imgs])
    return up, d.target.astype(np.int64)


def moving_digit_video(img: np.ndarray, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The digit shrunk to half the frame, sliding left -> right (random row): uint8 [T, size, size]."""
    from PIL import Image

    half = size // 2
    small = np.asarray(Image.fromarray(img).resize((half, half), Image.BICUBIC))
    row = int(rng.integers(0, size - half + 1))
    xs = np.linspace(0, size - half, frames).round().astype(int)
    video = np.zeros((frames, size, size), np.uint8)
    for t, x in enumerate(xs):
        video[t, row:row + half, x:x + half] = small
    return video


def write_wav(path: Path, wav: np.ndarray, sample_rate: int) -> None:
    pcm = (np.clip(wav, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())


def speech_phrases(d: int) -> list[str]:
    """What the speech clips say about digit d (scored on the first digit named)."""
    return [WORDS_EN[d], f"the number {WORDS_EN[d]}", f"{WORDS_EN[d]} plus {WORDS_EN[(d + 3) % 10]}"]


def speech_clips(sample_rate: int = 16000, voices=VOICES) -> tuple[list[dict], str]:
    """Digit words and short sentences, `voices` x `TRAIN_SPEECH`: list of {text, digit, voice, rate, pitch, wav};
    and the engine."""
    from ernie5.data.speech import Speaker

    spk = Speaker(sample_rate)
    clips = []
    for voice, rate, pitch in voices:
        for mult, shift in TRAIN_SPEECH:
            for d in range(10):
                for text in speech_phrases(d):
                    r, p = int(rate * mult), pitch + shift
                    clips.append({"text": text, "digit": d, "voice": voice, "rate": r, "pitch": p,
                                  "wav": spk.say(text, voice, r, p)})
    return clips, spk.engine


def fetch_eval_speech(out_dir: str, sample_rate: int = 16000, settings=EVAL_SPEECH) -> dict:
    """Write the evaluation-only recordings (`settings` x every phrase of every digit) as
    `eval_audio/NNNNN.wav` + `eval_audio_index.json` (per clip: file, text, digit, voice, rate, pitch, subset)."""
    from ernie5.data.speech import Speaker

    out = Path(out_dir)
    (out / "eval_audio").mkdir(parents=True, exist_ok=True)
    spk = Speaker(sample_rate)
    index = []
    for voice, rate, pitch, subset in settings:
        for d in range(10):
            for text in speech_phrases(d):
                name = f"eval_audio/{len(index):05d}.wav"
                write_wav(out / name, spk.say(text, voice, rate, pitch), sample_rate)
                index.append({"file": name, "text": text, "digit": d, "voice": voice, "rate": rate, "pitch": pitch,
                              "subset": subset})
    (out / "eval_audio_index.json").write_text(json.dumps({"sample_rate": sample_rate, "engine": spk.engine,
                                                           "clips": index}, ensure_ascii=False))
    return {"eval_speech_clips": len(index), "speech_engine": spk.engine}


def load_eval_speech(data_dir: str) -> dict:
    """`eval_audio_index.json` (a clear error when the world was fetched before the evaluation set existed)."""
    path = Path(data_dir) / "eval_audio_index.json"
    if not path.is_file():
        raise UserError(str(path), "evaluation speech not found (run `ernie5 data fetch --multimodal` again)")
    return json.loads(path.read_text(encoding="utf-8"))


def fetch_digits_world(out_dir: str, image_size: int = 16, frames: int = 4, num_videos: int = 100,
                       sample_rate: int = 16000, seed: int = 0, num_images: int = NUM_DOC_IMAGES,
                       eval_speech: bool = True, voices=VOICES) -> dict:
    """Write the digits world under `out_dir`; returns counts (and which speech engine was used). `eval_speech`:
    also the evaluation-only recordings; `voices`: the training voices (fewer for quick tests)."""
    out = Path(out_dir)
    for sub in ("images", "videos", "audio"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    from PIL import Image

    imgs, labels = digit_images(image_size)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(out / "images" / f"{i:05d}.png")
    vids = np.stack([moving_digit_video(imgs[i], frames, image_size, rng) for i in range(num_videos)])
    for i, v in enumerate(vids):
        np.save(out / "videos" / f"{i:05d}.npy", v)
    clips, engine = speech_clips(sample_rate, voices)
    max_len = max(len(c["wav"]) for c in clips)
    audio = np.zeros((len(clips), max_len), np.float32)
    index = []
    for i, c in enumerate(clips):
        write_wav(out / "audio" / f"{i:05d}.wav", c["wav"], sample_rate)
        audio[i, :len(c["wav"])] = c["wav"]
        index.append({"text": c["text"], "digit": c["digit"], "voice": c["voice"], "rate": c["rate"],
                      "pitch": c["pitch"], "samples": len(c["wav"])})
    np.save(out / "images.npy", imgs)
    np.save(out / "labels.npy", labels)
    np.save(out / "videos.npy", vids)
    np.save(out / "audio.npy", audio)
    (out / "audio_index.json").write_text(json.dumps({"sample_rate": sample_rate, "engine": engine,
                                                      "clips": index}, ensure_ascii=False))
    samples = list(_documents(labels, num_videos, index, num_images))
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    evals = fetch_eval_speech(out_dir, sample_rate)["eval_speech_clips"] if eval_speech else 0
    return {"images": len(imgs), "videos": num_videos, "speech_clips": len(clips), "eval_speech_clips": evals,
            "documents": len(samples), "speech_engine": engine}


def _documents(labels, num_videos, audio_index, num_images):
    """Mixed documents over the media, both directions per item: caption->image (captions alternate English /
    Chinese) and image->caption (one document per language: a caption carries the image's digit in one or two
    tokens, so understanding gets two of them per image), speech->text and text->speech, caption->video."""
    for i, d in enumerate(labels[:num_images]):
        d = int(d)
        split = "val" if is_heldout(i) else "train"
        img = {"kind": "image", "path": f"images/{i:05d}.png"}
        cap_gen = caption_en(d) if i % 2 == 0 else caption_zh(d)
        yield {"id": f"t2i{i}", "split": split,
               "segments": [{"kind": "text", "text": cap_gen}, {**img, "role": "target"}]}
        for lang, cap_und in (("zh", caption_zh(d)), ("en", caption_en(d))):
            yield {"id": f"i2t{i}{lang}", "split": split,
                   "segments": [{**img, "role": "input"}, {"kind": "sep"}, {"kind": "text", "text": cap_und}]}
    for i in range(num_videos):
        d = int(labels[i])
        yield {"id": f"vid{i}", "split": "val" if is_heldout(i) else "train",
               "segments": [{"kind": "text", "text": f"a {WORDS_EN[d]} moving right"},
                            {"kind": "video", "path": f"videos/{i:05d}.npy", "role": "target"}]}
    for i, c in enumerate(audio_index):
        a = {"kind": "audio", "path": f"audio/{i:05d}.wav"}
        split = "val" if is_heldout_clip(i) else "train"
        yield {"id": f"asr{i}", "split": split,
               "segments": [{**a, "role": "input"}, {"kind": "sep"}, {"kind": "text", "text": c["text"]}]}
        yield {"id": f"tts{i}", "split": split,
               "segments": [{"kind": "text", "text": c["text"]}, {**a, "role": "target"}]}


def load_arrays(data_dir: str) -> dict:
    """The packed arrays written by `fetch_digits_world` (a clear error if the world was not fetched)."""
    root = Path(data_dir)
    out = {}
    for name in ("images", "labels", "videos", "audio"):
        out[name] = read_npy(root / f"{name}.npy", "digits world not found (run `ernie5 data fetch --multimodal`)")
    out["audio_index"] = json.loads((root / "audio_index.json").read_text(encoding="utf-8"))
    return out
