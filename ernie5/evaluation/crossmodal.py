"""`ernie5 eval CKPT --crossmodal`: cross-modal scores of a unified checkpoint on the held-out digits world.

- caption accuracy: image -> text on digit images no document ever used (`eval_image_indices()`); correct if the
  first digit the caption names (English word, Chinese numeral or an Arabic digit) is the image's label;
- speech recognition accuracy: held-out speech clips (`is_heldout_clip(i)`) -> text; correct if the first digit named
  is the clip's digit ("four plus seven" clips are scored on their first digit);
- text -> image accuracy: "a handwritten seven" / "手写的数字七" -> image (bits sampled at `t2i_temperature`),
  decoded by the vision tokenizer and classified by a judge: a scikit-learn LogisticRegression on all 1797 real
  digit images at the tokenizer's size (pixels in [0, 1]). The judge's accuracy on the tokenizer's own
  reconstructions of the eval images is the ceiling (the model cannot draw better than the tokenizer decodes).
Chance is 10% for each; the report also gives each eval set's digit counts and the score of always answering its
most frequent digit (the held-out speech clips, index % 10 == 9, name only 3, 6 and 9: a constant answer gets 33%).
Writes `crossmodal.json` into the checkpoint directory (or `--out`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import numpy as np

from ernie5.data.digits_world import WORDS_EN, WORDS_ZH, caption_en, caption_zh, eval_image_indices, is_heldout_clip
from ernie5.errors import UserError

CHANCE = 0.10
_DIGIT_RE = re.compile(r"\b(" + "|".join(WORDS_EN) + r")\b|([" + "".join(WORDS_ZH) + r"〇])|(?<!\d)(\d)(?!\d)",
                       re.IGNORECASE)


def first_digit(text: str) -> Optional[int]:
    """The first digit a text names: an English word (whole word), a Chinese numeral or a lone Arabic digit."""
    m = _DIGIT_RE.search(text or "")
    if m is None:
        return None
    if m.group(1):
        return WORDS_EN.index(m.group(1).lower())
    if m.group(2):
        return 0 if m.group(2) == "〇" else WORDS_ZH.index(m.group(2))
    return int(m.group(3))


def score_digit(text: str, digit: int) -> bool:
    return first_digit(text) == int(digit)


def resolve_world(world: Optional[str], meta: Optional[dict]) -> Path:
    """The digits world directory: --world, else next to the manifest named in meta.json, else the demo path."""
    cands = [world] if world else ([str(Path(meta["manifest"]).parent)] if meta and meta.get("manifest") else []) \
        + ["data/raw/digits_world"]
    for c in cands:
        if (Path(c) / "images.npy").is_file():
            return Path(c)
    raise UserError(cands[0], "digits world not found (run `ernie5 data fetch --multimodal`, or pass --world DIR)")


def _baselines(digits) -> dict:
    """The eval set's digit counts and the accuracy of always answering its most frequent digit (the uniform
    chance level is 10%, but an eval set covering few digits makes a constant answer score higher)."""
    counts = np.bincount(np.asarray(digits, np.int64), minlength=10)
    return {"digit_counts": counts.tolist(), "majority": float(counts.max() / max(counts.sum(), 1))}


def _bar(it, progress: bool, desc: str, total: Optional[int] = None):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, unit="item")


def train_judge(images_NHW: np.ndarray, labels_N: np.ndarray):
    """LogisticRegression on pixels in [0, 1] (uint8 images)."""
    from sklearn.linear_model import LogisticRegression

    x = images_NHW.reshape(len(images_NHW), -1).astype(np.float32) / 255.0
    return LogisticRegression(max_iter=2000, C=1.0).fit(x, labels_N)


def _judge(judge, pixels_NHW_pm1: np.ndarray) -> np.ndarray:
    """Predicted digits of pixels in [-1, 1]."""
    x = np.clip((pixels_NHW_pm1 + 1) / 2, 0, 1).reshape(len(pixels_NHW_pm1), -1)
    return judge.predict(x)


def evaluate_crossmodal(ckpt_path: str, out: Optional[str] = None, n: int = 100, clips: int = 0,
                        per_digit: int = 5, world: Optional[str] = None, t2i_temperature: float = 1.0,
                        seed: int = 0, progress: bool = True, overrides: list[str] = ()) -> dict:
    """Run the three scores; returns the report (also written as crossmodal.json). `clips` 0: every held-out
    speech clip."""
    import paddle

    from ernie5.generation import tasks as T
    from ernie5.generation.assets import decode_image, load_generator

    g = load_generator(ckpt_path, list(overrides))
    g.need_multimodal("--crossmodal")
    root = resolve_world(world, g.meta)
    images = np.load(root / "images.npy")
    labels = np.load(root / "labels.npy")
    index = json.loads((root / "audio_index.json").read_text(encoding="utf-8"))["clips"]
    side = g.vision.cfg.image_size
    if images.shape[1:] != (side, side):
        raise UserError(str(root / "images.npy"), f"images are {images.shape[1:]}, the vision tokenizer takes "
                                                   f"{side}x{side}")
    m, v = g.model, g.vocab
    report = {"checkpoint": str(g.ckpt), "world": str(root), "chance": CHANCE}

    # image -> caption
    pool = np.asarray(eval_image_indices())
    pick = pool[np.linspace(0, len(pool) - 1, min(n, len(pool))).round().astype(int)]
    hits, examples = [], []
    for i in _bar(pick, progress, "caption"):
        px = images[i].astype(np.float32) / 127.5 - 1.0
        rows = T.caption_prompt(m, g.segments.understanding_features(px[None]), v)
        text = g.text.decode(T.continue_text(m, rows, v, max_new=16).ids)
        hits.append(score_digit(text, labels[i]))
        if len(examples) < 10:
            examples.append({"image": int(i), "digit": int(labels[i]), "caption": text})
    report["caption"] = {"accuracy": float(np.mean(hits)), "n": len(hits), **_baselines(labels[pick]),
                         "examples": examples}

    # speech -> text
    held = [i for i in range(len(index)) if is_heldout_clip(i)]
    if clips:
        held = held[:clips]
    hits, examples = [], []
    for i in _bar(held, progress, "asr"):
        # tokenised exactly as `ernie5 data prepare` did (WAV file -> padded to whole frames -> codes)
        seg = g.segments({"kind": "audio", "path": str((root / f"audio/{i:05d}.wav").resolve()), "role": "input"})
        text = g.text.decode(T.continue_text(m, T.asr_prompt(m, seg.audio_codes, v), v, max_new=16).ids)
        hits.append(score_digit(text, index[i]["digit"]))
        if len(examples) < 10:
            examples.append({"clip": i, "said": index[i]["text"], "heard": text})
    report["asr"] = {"accuracy": float(np.mean(hits)) if hits else None, "n": len(hits),
                     **_baselines([index[i]["digit"] for i in held]), "examples": examples}

    # text -> image, judged
    judge = train_judge(images, labels)
    rng = np.random.default_rng(seed)
    prompts = [(d, caption_en(d) if j % 2 == 0 else caption_zh(d), "en" if j % 2 == 0 else "zh")
               for d in range(10) for j in range(per_digit)]
    pix, digits, langs = [], [], []
    for d, caption, lang in _bar(prompts, progress, "t2i"):
        res = T.generate_image(m, g.text.encode(caption), v, g.vision, temperature=t2i_temperature, rng=rng)
        pix.append(decode_image(g.vision, res.codes))
        digits.append(d)
        langs.append(lang)
    pred = _judge(judge, np.stack(pix))
    ok = pred == np.asarray(digits)
    langs = np.asarray(langs)
    with paddle.no_grad():  # ceiling: the judge on the tokenizer's reconstructions of the eval images
        x = paddle.to_tensor((images[pick].astype(np.float32) / 127.5 - 1.0)[:, None, None])
        rec = g.vision.decode(g.vision.encode(x)).numpy()[:, 0, 0]
    ceiling = float(np.mean(_judge(judge, rec) == labels[pick]))
    real = float(np.mean(_judge(judge, images[pick].astype(np.float32) / 127.5 - 1.0) == labels[pick]))
    report["t2i"] = {"accuracy": float(ok.mean()), "n": int(len(ok)), "temperature": t2i_temperature,
                     "accuracy_en": float(ok[langs == "en"].mean()) if (langs == "en").any() else None,
                     "accuracy_zh": float(ok[langs == "zh"].mean()) if (langs == "zh").any() else None,
                     **_baselines(digits), "judge_on_reconstructions": ceiling, "judge_on_real": real,
                     "predicted": [int(p) for p in pred]}
    path = Path(out) / "crossmodal.json" if out else g.ckpt / "crossmodal.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    report["path"] = str(path)
    return report


def format_table(r: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    t = r["t2i"]
    lines = [f"cross-modal scores of {r['checkpoint']} (held-out digits world)", "",
             "| task | accuracy | n | chance | constant answer |", "|---|---|---|---|---|"]
    for name, key in (("image -> caption", "caption"), ("speech -> text", "asr"),
                      (f"text -> image (judge, T={t['temperature']})", "t2i")):
        lines.append(f"| {name} | {pct(r[key]['accuracy'])} | {r[key]['n']} | {pct(r['chance'])} | "
                     f"{pct(r[key]['majority'])} |")
    lines += [f"|   English / Chinese prompts | {pct(t['accuracy_en'])} / {pct(t['accuracy_zh'])} | | | |",
              f"|   ceiling: judge on tokenizer reconstructions | {pct(t['judge_on_reconstructions'])} | "
              f"{r['caption']['n']} | | |",
              f"|   judge on the real images | {pct(t['judge_on_real'])} | {r['caption']['n']} | | |"]
    said = [d for d in range(10) if r["asr"]["digit_counts"][d]]
    if 0 < len(said) < 10:
        lines.append(f"(the held-out speech clips name only the digits {', '.join(map(str, said))}: "
                     "a constant answer scores the last column)")
    ex = r["caption"]["examples"][:3] + [{"said": e["said"], "caption": e["heard"]} for e in r["asr"]["examples"][:3]]
    if ex:
        lines += ["", "examples: " + "; ".join(
            f"{e.get('digit', e.get('said'))} -> {e['caption']!r}" for e in ex)]
    return "\n".join(lines) + "\n"
