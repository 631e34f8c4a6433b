"""`ernie5 eval CKPT --crossmodal`: cross-modal scores of a unified checkpoint on held-out digits-world items,
each accuracy with its 95% Wilson score interval.

- caption accuracy: image -> text on the 597 digit images no document ever used (`eval_image_indices()`);
  correct if the first digit the caption names (English word, Chinese numeral or an Arabic digit) is the label;
- speech recognition accuracy: the 600 evaluation-only recordings (`digits_world.EVAL_SPEECH`: the training voices
  at unseen rates / pitches, and voices no training clip uses; never in a document or the codec's training data)
  -> text; correct if the first digit named is the clip's digit ("four plus seven" is scored on "four"). Each
  subset is reported too;
- text -> image accuracy: "a handwritten seven" / "手写的数字七" -> image (bits sampled at `t2i_temperature`;
  50 prompts per digit, half English, half Chinese), decoded by the vision tokenizer and classified by a judge: a
  scikit-learn LogisticRegression on all 1797 real digit images at the tokenizer's size (pixels in [0, 1]). The
  judge's accuracy on the tokenizer's own reconstructions of the eval images is the ceiling.
Chance is 10% for each; the report also gives each eval set's digit counts and the score of always answering its
most frequent digit (the constant-answer baseline). Generation is greedy for text and batched (`batched`):
items of one layout go through the model side by side, and a text answer stops once its first digit is decided.
Writes `crossmodal.json` into the checkpoint directory (or `--out`).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ernie5.data.digits_world import WORDS_EN, WORDS_ZH, caption_en, caption_zh, eval_image_indices, load_eval_speech
from ernie5.errors import UserError

CHANCE = 0.10
Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
BATCH = 128  # documents fed side by side
T2I_PER_DIGIT = 50  # default text -> image prompts per digit (500 in all)
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


def digit_decided(text: str) -> bool:
    """True once more text cannot change `first_digit(text)`: a digit is named and something follows it (an
    English word or an Arabic digit at the very end could still grow into another word or number)."""
    m = _DIGIT_RE.search(text or "")
    return m is not None and (m.group(2) is not None or m.end() < len(text))


def score_digit(text: str, digit: int) -> bool:
    return first_digit(text) == int(digit)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (95% with the default z); (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z / den * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(hits) -> dict:
    """{accuracy, correct, n, ci95: [lo, hi]} of a list of booleans (accuracy None when empty)."""
    k, n = int(np.sum(hits)), len(hits)
    lo, hi = wilson_interval(k, n)
    return {"accuracy": k / n if n else None, "correct": k, "n": n, "ci95": [lo, hi]}


def spread(n_items: int, k: Optional[int]) -> np.ndarray:
    """Indices of k items evenly spread over n_items (all of them when k is None or >= n_items)."""
    if k is None or k >= n_items:
        return np.arange(n_items)
    return np.unique(np.linspace(0, n_items - 1, k).round().astype(int))


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


def _bar(it, progress: bool, desc: str, unit: str = "batch"):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False, unit=unit)


def _batches(items: list, size: int = BATCH):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def train_judge(images_NHW: np.ndarray, labels_N: np.ndarray):
    """LogisticRegression on pixels in [0, 1] (uint8 images)."""
    from sklearn.linear_model import LogisticRegression

    x = images_NHW.reshape(len(images_NHW), -1).astype(np.float32) / 255.0
    return LogisticRegression(max_iter=2000, C=1.0).fit(x, labels_N)


def _judge(judge, pixels_NHW_pm1: np.ndarray) -> np.ndarray:
    """Predicted digits of pixels in [-1, 1]."""
    x = np.clip((pixels_NHW_pm1 + 1) / 2, 0, 1).reshape(len(pixels_NHW_pm1), -1)
    return judge.predict(x)


def _answers(g, prompts: list[dict], progress: bool, desc: str) -> list[str]:
    """Greedy text answers of prompts that share one layout, batched, each stopped once its digit is decided."""
    from ernie5.evaluation.batched import greedy_text

    out = []
    for chunk in _bar(list(_batches(prompts)), progress, desc):
        ids = greedy_text(g.model, chunk, g.vocab, max_new=16, done=lambda t: digit_decided(g.text.decode(t)))
        out += [g.text.decode(t) for t in ids]
    return out


def evaluate_caption(g, images: np.ndarray, labels: np.ndarray, pick: np.ndarray, progress: bool = True) -> dict:
    from ernie5.generation import tasks as T

    prompts = [T.caption_prompt(g.model, g.segments.understanding_features(
        (images[i].astype(np.float32) / 127.5 - 1.0)[None]), g.vocab) for i in pick]
    texts = _answers(g, prompts, progress, "caption")
    hits = [score_digit(t, labels[i]) for t, i in zip(texts, pick)]
    return {**accuracy(hits), **_baselines(labels[pick]),
            "examples": [{"image": int(i), "digit": int(labels[i]), "caption": t} for t, i in zip(texts[:10], pick)]}


def evaluate_speech(g, root: Path, clips: Optional[int] = None, progress: bool = True) -> dict:
    """Speech -> text on the evaluation-only recordings (`clips`: an evenly spread subset)."""
    from ernie5.generation import tasks as T

    index = load_eval_speech(str(root))["clips"]
    chosen = [index[i] for i in spread(len(index), clips)]
    groups: dict[int, list] = {}  # clips with the same number of frames share a layout
    for c in _bar(chosen, progress, "speech codes", "clip"):
        # tokenised exactly as `ernie5 data prepare` tokenises a clip (WAV -> padded to whole frames -> codes)
        seg = g.segments({"kind": "audio", "path": str((root / c["file"]).resolve()), "role": "input"})
        groups.setdefault(len(seg.audio_codes), []).append((c, T.asr_prompt(g.model, seg.audio_codes, g.vocab)))
    heard: list[tuple[dict, str]] = []
    for _, members in sorted(groups.items()):
        texts = _answers(g, [p for _, p in members], False, "asr")
        heard += [(c, t) for (c, _), t in zip(members, texts)]
    heard.sort(key=lambda ct: ct[0]["file"])
    hits = [score_digit(t, c["digit"]) for c, t in heard]
    subsets = {}
    for name in sorted({c["subset"] for c, _ in heard}):
        sub = [h for h, (c, _) in zip(hits, heard) if c["subset"] == name]
        subsets[name] = accuracy(sub)
    return {**accuracy(hits), **_baselines([c["digit"] for c, _ in heard]), "subsets": subsets,
            "examples": [{"clip": c["file"], "voice": c["voice"], "said": c["text"], "heard": t}
                         for c, t in heard[::max(1, len(heard) // 10)][:10]]}


def evaluate_t2i(g, images: np.ndarray, labels: np.ndarray, per_digit: int, temperature: float, seed: int,
                 ceiling_pick: np.ndarray, progress: bool = True) -> dict:
    import paddle

    from ernie5.evaluation.batched import generate_images

    judge = train_judge(images, labels)
    rng = np.random.default_rng(seed)
    jobs = [(d, lang, caption_en(d) if lang == "en" else caption_zh(d), (per_digit + (lang == "en")) // 2)
            for d in range(10) for lang in ("en", "zh")]
    pix, digits, langs = [], [], []
    with paddle.no_grad():
        for d, lang, caption, count in _bar(jobs, progress, "t2i"):
            if count == 0:
                continue
            codes = generate_images(g.model, g.text.encode(caption), count, g.vocab, g.vision, temperature, rng)
            pix.append(g.vision.decode([paddle.to_tensor(c) for c in codes]).numpy()[:, 0, 0])
            digits += [d] * count
            langs += [lang] * count
    pred = _judge(judge, np.concatenate(pix))
    ok = pred == np.asarray(digits)
    langs = np.asarray(langs)
    with paddle.no_grad():  # ceiling: the judge on the tokenizer's reconstructions of the eval images
        x = paddle.to_tensor((images[ceiling_pick].astype(np.float32) / 127.5 - 1.0)[:, None, None])
        rec = g.vision.decode(g.vision.encode(x)).numpy()[:, 0, 0]
    ceiling = float(np.mean(_judge(judge, rec) == labels[ceiling_pick]))
    real = float(np.mean(_judge(judge, images[ceiling_pick].astype(np.float32) / 127.5 - 1.0)
                         == labels[ceiling_pick]))
    return {**accuracy(ok.tolist()), "temperature": temperature,
            "en": accuracy(ok[langs == "en"].tolist()), "zh": accuracy(ok[langs == "zh"].tolist()),
            **_baselines(digits), "judge_on_reconstructions": ceiling, "judge_on_real": real,
            "predicted": [int(p) for p in pred]}


def evaluate_crossmodal(ckpt_path: str, out: Optional[str] = None, n: Optional[int] = None,
                        clips: Optional[int] = None, per_digit: Optional[int] = None, world: Optional[str] = None,
                        t2i_temperature: float = 1.0, seed: int = 0, progress: bool = True,
                        overrides: list[str] = ()) -> dict:
    """Run the three scores; returns the report (also written as crossmodal.json). Quick runs: `n` caption images
    and text -> image prompts (None: all 597 eval images and T2I_PER_DIGIT prompts per digit), `clips`
    evaluation recordings (None or 0: all 600); `per_digit` overrides the text -> image prompts per digit."""
    from ernie5.generation.assets import load_generator

    t0 = time.perf_counter()
    g = load_generator(ckpt_path, list(overrides))
    g.need_multimodal("--crossmodal")
    g.model.eval()
    root = resolve_world(world, g.meta)
    images = np.load(root / "images.npy")
    labels = np.load(root / "labels.npy")
    side = g.vision.cfg.image_size
    if images.shape[1:] != (side, side):
        raise UserError(str(root / "images.npy"), f"images are {images.shape[1:]}, the vision tokenizer takes "
                                                   f"{side}x{side}")
    report = {"checkpoint": str(g.ckpt), "world": str(root), "chance": CHANCE, "seconds": {}}
    pool = np.asarray(eval_image_indices())
    pick = pool[spread(len(pool), n)]
    t = time.perf_counter()
    report["caption"] = evaluate_caption(g, images, labels, pick, progress)
    report["seconds"]["caption"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    report["asr"] = evaluate_speech(g, root, clips or None, progress)
    report["seconds"]["asr"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    per_digit = per_digit if per_digit is not None else (T2I_PER_DIGIT if n is None else max(1, n // 10))
    report["t2i"] = evaluate_t2i(g, images, labels, per_digit, t2i_temperature, seed, pick, progress)
    report["seconds"]["t2i"] = round(time.perf_counter() - t, 1)
    report["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    path = Path(out) / "crossmodal.json" if out else g.ckpt / "crossmodal.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    report["path"] = str(path)
    return report


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def ci(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{100 * lo:.1f}-{100 * hi:.1f}%"


def format_table(r: dict) -> str:
    t = r["t2i"]
    lines = [f"cross-modal scores of {r['checkpoint']} (held-out digits world; 95% Wilson intervals)", "",
             "| task | accuracy | 95% interval | n | chance | constant answer |", "|---|---|---|---|---|---|"]
    for name, key in (("image -> caption", "caption"), ("speech -> text", "asr"),
                      (f"text -> image (judge, T={t['temperature']})", "t2i")):
        lines.append(f"| {name} | {pct(r[key]['accuracy'])} | {ci(r[key])} | {r[key]['n']} | {pct(r['chance'])} | "
                     f"{pct(r[key]['majority'])} |")
        if key == "asr":
            for sub, s in r["asr"].get("subsets", {}).items():
                lines.append(f"|   {sub}s | {pct(s['accuracy'])} | {ci(s)} | {s['n']} | | |")
    lines += [f"|   English / Chinese prompts | {pct(t['en']['accuracy'])} / {pct(t['zh']['accuracy'])} | | | | |",
              f"|   ceiling: judge on tokenizer reconstructions | {pct(t['judge_on_reconstructions'])} | | "
              f"{r['caption']['n']} | | |",
              f"|   judge on the real images | {pct(t['judge_on_real'])} | | {r['caption']['n']} | | |"]
    said = [d for d in range(10) if r["asr"]["digit_counts"][d]]
    if 0 < len(said) < 10:
        lines.append(f"(the speech clips scored name only the digits {', '.join(map(str, said))}: a constant answer "
                     "scores the last column)")
    ex = [{"said": e["digit"], "out": e["caption"]} for e in r["caption"]["examples"][:3]] + \
        [{"said": e["said"], "out": e["heard"]} for e in r["asr"]["examples"][:3]]
    if ex:
        lines += ["", "examples: " + "; ".join(f"{e['said']} -> {e['out']!r}" for e in ex)]
    if r.get("seconds"):
        lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()))
    return "\n".join(lines) + "\n"
