""""Digits world": one small concept set (the digits 0-9) in every modality, built from installed packages only.

- images: scikit-learn's 1797 real 8x8 handwritten digits, upsampled to `image_size` (PNG files);
- videos: a digit moving across the frame, `frames` frames (uint8 .npy files [T, H, W]);
- speech: digit words and short sentences synthesised with espeak-ng (`ernie5.data.speech`), 16 kHz WAV;
- captions: English and Chinese ("a handwritten seven", "手写的数字七").

Documents go both ways for every item: image -> caption (understanding) and caption -> image (generation),
speech -> text and text -> speech; captions alternate English / Chinese. Only the first `num_images` digit images
enter documents (held-out: index % 10 == 9); the remaining ones are never seen in training: `eval_images()` is
what the cross-modal scores use.

`fetch_digits_world(out)` writes the media, packed arrays for tokenizer training (`images.npy`, `labels.npy`,
`videos.npy`, `audio.npy` + `audio_index.json`) and `samples.jsonl`: one document per line, a list of segments
that `ernie5 data prepare` turns into the unified token stream. Held-out = every item whose index % 10 == 9.
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


def is_heldout(index: int) -> bool:
    return index % 10 == 9


def is_heldout_clip(index: int) -> bool:
    """Held-out speech clips: a fixed pseudo-random 10% (clip order runs voice -> rate -> digit -> phrase, so
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


def speech_clips(sample_rate: int = 16000) -> tuple[list[dict], str]:
    """Digit words and short sentences in several voices: list of {text, digit, voice, wav}; and the engine."""
    from ernie5.data.speech import Speaker

    spk = Speaker(sample_rate)
    clips = []
    for voice, rate, pitch in VOICES:
        for mult in RATES:
            for d in range(10):
                for text in (WORDS_EN[d], f"the number {WORDS_EN[d]}",
                             f"{WORDS_EN[d]} plus {WORDS_EN[(d + 3) % 10]}"):
                    clips.append({"text": text, "digit": d, "voice": voice,
                                  "wav": spk.say(text, voice, int(rate * mult), pitch)})
    return clips, spk.engine


def fetch_digits_world(out_dir: str, image_size: int = 16, frames: int = 4, num_videos: int = 100,
                       sample_rate: int = 16000, seed: int = 0, num_images: int = NUM_DOC_IMAGES) -> dict:
    """Write the digits world under `out_dir`; returns counts (and which speech engine was used)."""
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
    clips, engine = speech_clips(sample_rate)
    max_len = max(len(c["wav"]) for c in clips)
    audio = np.zeros((len(clips), max_len), np.float32)
    index = []
    for i, c in enumerate(clips):
        write_wav(out / "audio" / f"{i:05d}.wav", c["wav"], sample_rate)
        audio[i, :len(c["wav"])] = c["wav"]
        index.append({"text": c["text"], "digit": c["digit"], "voice": c["voice"], "samples": len(c["wav"])})
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
    return {"images": len(imgs), "videos": num_videos, "speech_clips": len(clips), "documents": len(samples),
            "speech_engine": engine}


def _documents(labels, num_videos, audio_index, num_images):
    """Mixed documents over the media, both directions per item: caption->image and image->caption (captions
    alternate English / Chinese), speech->text and text->speech, caption->video."""
    for i, d in enumerate(labels[:num_images]):
        d = int(d)
        split = "val" if is_heldout(i) else "train"
        img = {"kind": "image", "path": f"images/{i:05d}.png"}
        cap_gen = caption_en(d) if i % 2 == 0 else caption_zh(d)
        cap_und = caption_zh(d) if i % 2 == 0 else caption_en(d)
        yield {"id": f"t2i{i}", "split": split,
               "segments": [{"kind": "text", "text": cap_gen}, {**img, "role": "target"}]}
        yield {"id": f"i2t{i}", "split": split,
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
