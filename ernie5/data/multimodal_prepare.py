"""`ernie5 data prepare CONFIG` for `kind: multimodal` configs: tokenise a manifest of mixed documents offline
(tokenizers run apart from the backbone) and write packed train / val rows.

Manifest: JSON lines `{"id", "split", "segments": [{"kind": text|image|video|audio|sep, "text" | "path",
"role": input|target}]}`, media paths relative to the manifest. A document whose media is missing or corrupt
is skipped with a one-line reason naming the file; the rest of the shard is unaffected.

Every document ends with the text tokenizer's EOS (so generation knows where a caption or answer stops).
Optionally `text_corpus` files (one document per line) add `text_documents` text-only documents, cut to
`text_doc_tokens` tokens, so the unified model keeps learning plain language.

Shard: `DIR/{split}.{field}.npy` (fields of `sequence.FIELDS` + `doc`, each [rows, seq_len, ...]; plus
`{split}.und_table.npy` [M, K, F] when there are understanding inputs), `DIR/vis_history.npz` (the linear map
from earlier scales' sign bits to next-scale inputs, see `visual_history_maps`: training uses it to corrupt the
visual history by bit flips) and `DIR/meta.json` (sizes, sha256, tokenizer identities, special-token ids,
feature sizes, skipped documents).
"""

from __future__ import annotations

import json
import os
import shutil
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ernie5.config.schema import build, join, require
from ernie5.config.yaml_io import apply_overrides, load_yaml
from ernie5.constants import MULTIMODAL_FORMAT
from ernie5.data.sequence import SPECIALS, Segment, build_document, pack_documents, special_ids
from ernie5.data.shards import sha256_file
from ernie5.data.npy import read_npy
from ernie5.errors import UserError


@dataclass
class MultimodalDataConfig:
    """Inputs, tokenizers and row length of the multimodal shards."""

    kind: Literal["multimodal"] = "multimodal"
    manifest: str = "data/raw/digits_world/samples.jsonl"
    out_dir: str = "data/shards/digits_world"
    text_tokenizer: str = "tokenizers/demo_text.model"
    vision_tokenizer: str = "tokenizers/digits_vision_b4.safetensors"
    audio_tokenizer: str = "tokenizers/digits_audio.safetensors"
    seq_len: int = 512
    max_documents: int = 0  # 0: all
    text_corpus: list[str] = field(default_factory=list)  # plain-text files mixed in as text-only documents
    text_documents: int = 0  # how many of them (0: none)
    text_doc_tokens: int = 256  # each cut to at most this many tokens

    def validate(self, path: str) -> None:
        require(self.seq_len >= 8, join(path, "seq_len"), "must be >= 8")
        require(self.text_documents >= 0, join(path, "text_documents"), "must be >= 0")
        require(8 <= self.text_doc_tokens < self.seq_len, join(path, "text_doc_tokens"),
                f"{self.text_doc_tokens} must be in [8, seq_len)")


def load_multimodal_config(path: str, overrides=()) -> MultimodalDataConfig:
    return build(MultimodalDataConfig, apply_overrides(load_yaml(Path(path)), list(overrides)), "")


# -- media readers: every failure is a UserError naming the file ---------------------------------------------
def read_image(path: Path) -> np.ndarray:
    """Grayscale pixels in [-1, 1]: [H, W]."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UserError(str(path), "image file missing")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), np.float32) / 127.5 - 1.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(str(path), f"corrupt image ({type(e).__name__})") from None


def read_video(path: Path) -> np.ndarray:
    """uint8 frames .npy [T, H, W] -> [-1, 1]."""
    v = read_npy(path, "video file missing", ndim=3, layout="frames [T, H, W]")
    return v.astype(np.float32) / 127.5 - 1.0


def read_wav(path: Path, sample_rate: int) -> np.ndarray:
    if not path.is_file():
        raise UserError(str(path), "audio file missing")
    try:
        with wave.open(str(path), "rb") as f:
            if f.getsampwidth() != 2 or f.getnchannels() != 1:
                raise UserError(str(path), "expected 16-bit mono WAV")
            if f.getframerate() != sample_rate:
                raise UserError(str(path), f"sample rate {f.getframerate()} != tokenizer's {sample_rate}")
            pcm = np.frombuffer(f.readframes(f.getnframes()), "<i2")
    except (wave.Error, EOFError, OSError) as e:
        raise UserError(str(path), f"corrupt WAV ({e})") from None
    if pcm.size == 0:
        raise UserError(str(path), "empty audio")
    return pcm.astype(np.float32) / 32768.0


class SegmentTokenizer:
    """Turns manifest segments into `Segment`s with the three tokenizers."""

    def __init__(self, cfg: MultimodalDataConfig, root: Path):
        from ernie5.modality.media_io import load_asset
        from ernie5.modality.text_tokenizer import TextTokenizer

        self.root = root
        self.text = TextTokenizer(cfg.text_tokenizer)
        self.vision = load_asset(cfg.vision_tokenizer)
        self.audio = load_asset(cfg.audio_tokenizer)
        self.bits, self.levels = self.vision.cfg.bits, self.audio.cfg.levels

    def __call__(self, raw: dict) -> Segment:
        import paddle

        kind, role = raw.get("kind"), raw.get("role", "target")
        if kind == "text":
            return Segment("text", role, ids=self.text.encode(raw["text"]))
        if kind == "sep":
            return Segment("sep", role)
        path = self.root / raw["path"]
        if kind in ("image", "video"):
            px = read_image(path)[None] if kind == "image" else read_video(path)
            side = self.vision.cfg.image_size
            if px.shape[1:] != (side, side):
                raise UserError(str(path), f"frames are {px.shape[1:]}, the vision tokenizer takes {side}x{side}")
            if role == "input":
                return Segment(kind, role, und=self.understanding_features(px))
            with paddle.no_grad():
                codes = self.vision.encode(paddle.to_tensor(px[None, None]))
                inputs = self.vision.next_scale_inputs(codes)
            return Segment(kind, role, codes=[c.numpy()[0] for c in codes], scale_inputs=[x.numpy()[0] for x in inputs])
        if kind == "audio":
            wav = read_wav(path, self.audio.cfg.sample_rate)
            hop = self.audio.cfg.hop
            padded = np.zeros(-(-len(wav) // hop) * hop, np.float32)
            padded[:len(wav)] = wav
            with paddle.no_grad():
                codes = self.audio.encode(paddle.to_tensor(padded[None]))
            return Segment("audio", role, audio_codes=codes.numpy()[0])
        raise UserError(f"segment kind {kind!r}", "expected text, image, video, audio or sep")

    def understanding_features(self, px_THW: np.ndarray) -> np.ndarray:
        """[T, h, w, C + P]: the tokenizer encoder's continuous features (the "CNN" path) and the raw pixels of
        each latent cell (P = (H/h)^2, the input of the model's ViT-style patch path)."""
        import paddle

        with paddle.no_grad():
            cnn = self.vision.features(paddle.to_tensor(px_THW[None, None])).numpy()[0]  # [T, h, w, C]
        T, H, _ = px_THW.shape
        h = cnn.shape[1]
        r = H // h
        pix = px_THW.reshape(T, h, r, h, r).transpose(0, 1, 3, 2, 4).reshape(T, h, h, r * r)
        return np.concatenate([cnn, pix], -1).astype(np.float32)

    @property
    def und_dims(self) -> tuple[int, int]:
        """(CNN feature channels, pixels per latent cell)."""
        c = self.vision.cfg
        side = c.latent_side
        return c.channels, (c.image_size // side) ** 2


def visual_history_maps(vision) -> dict:
    """The next-scale inputs as a linear map of the earlier scales' signs, measured by probing the tokenizer:
    inputs_k [s_k^2, d] = base_k + sum_{j<k} A_jk @ (signs_j + 1), signs = 2 bits - 1, where base_k is the input
    with every bit 0 and A_jk [s_k^2, s_j^2] half the response to setting one bit of scale j (every channel uses
    the same spatial map). So flipping history bits changes the inputs by sum_j A_jk @ (signs'_j - signs_j).
    Returns {"A_j_k": ..., "base_k": ...} for 0 <= j < k < len(scales)."""
    import paddle

    scales, d = vision.cfg.scales, vision.cfg.bits

    def inputs(codes):
        with paddle.no_grad():
            return [x.numpy()[0, 0].reshape(-1, d) for x in
                    vision.next_scale_inputs([paddle.to_tensor(c[None, None]) for c in codes])]

    zeros = [np.zeros((s, s, d), np.uint8) for s in scales]
    base = inputs(zeros)
    out = {f"base_{k}": base[k - 1] for k in range(1, len(scales))}
    for j, s in enumerate(scales[:-1]):
        cols = {k: np.zeros((scales[k] ** 2, s * s), np.float32) for k in range(j + 1, len(scales))}
        for p in range(s * s):
            codes = [z.copy() for z in zeros]
            codes[j].reshape(-1, d)[p, 0] = 1  # flip bit 0 of cell p: all channels share the spatial map
            probe = inputs(codes)
            for k in cols:
                cols[k][:, p] = (probe[k - 1][:, 0] - base[k - 1][:, 0]) / 2.0
        for k, a in cols.items():
            out[f"A_{j}_{k}"] = a
    return out


def prepare_multimodal(config_path: str, overrides=(), log=print) -> dict:
    cfg = load_multimodal_config(config_path, overrides)
    manifest = Path(cfg.manifest)
    if not manifest.is_file():
        raise UserError(str(manifest), "manifest not found (run `ernie5 data fetch --multimodal`)")
    tok = SegmentTokenizer(cfg, manifest.parent)
    eos = Segment("text", "target", ids=[tok.text.eos_id])
    docs = {"train": [], "val": []}
    skipped = []
    with open(manifest, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if cfg.max_documents and lineno > cfg.max_documents:
                break
            try:
                rec = json.loads(line)
                segs = [tok(s) for s in rec["segments"]] + [eos]
            except UserError as e:
                skipped.append(f"{manifest}:{lineno}: {e.where}: {e.reason}")
                continue
            except (ValueError, KeyError, TypeError) as e:
                skipped.append(f"{manifest}:{lineno}: malformed record ({type(e).__name__}: {e})")
                continue
            split = "val" if rec.get("split") == "val" else "train"
            docs[split].append(build_document(segs, tok.text.vocab_size, tok.bits, tok.levels))
    for split, ids in _text_documents(cfg, tok.text):
        docs[split].append(build_document([Segment("text", "target", ids=ids)], tok.text.vocab_size, tok.bits,
                                          tok.levels))
    for split in docs:  # mix modalities within rows (the manifest lists them grouped); fixed seed: reproducible
        order = np.random.default_rng(0).permutation(len(docs[split]))
        docs[split] = [docs[split][i] for i in order]
    for s in skipped:
        log(f"skipped {s}")
    stats = {"skipped_documents": len(skipped)}
    out = Path(cfg.out_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    und_cnn, und_pix = tok.und_dims
    meta = {"format": MULTIMODAL_FORMAT, "seq_len": cfg.seq_len, "text_vocab_size": tok.text.vocab_size,
            "specials": special_ids(tok.text.vocab_size), "special_names": SPECIALS, "bits": tok.bits,
            "audio_levels": tok.levels, "audio_codebook": tok.audio.cfg.codebook_size, "eos_id": tok.text.eos_id,
            "und_cnn_dim": und_cnn, "und_pix_dim": und_pix, "und_patches": 4,
            "scales": tok.vision.cfg.scales, "text_tokenizer": cfg.text_tokenizer,
            "vision_tokenizer": cfg.vision_tokenizer, "audio_tokenizer": cfg.audio_tokenizer,
            "manifest": str(manifest),
            "skipped": skipped, "splits": {}, "files": {}}
    for split, ds in docs.items():
        packed, dropped = pack_documents(ds, cfg.seq_len)
        if packed["und_table"] is None:
            packed["und_table"] = np.zeros((0, 4, und_cnn + und_pix), np.float32)
        for k, v in packed.items():
            np.save(tmp / f"{split}.{k}.npy", v)
        rows = int(packed["token"].shape[0])
        meta["splits"][split] = {"documents": len(ds) - dropped, "dropped_too_long": dropped, "rows": rows}
        stats[f"{split}_rows"], stats[f"{split}_documents"] = rows, len(ds) - dropped
        stats[f"{split}_too_long"] = dropped
    np.savez(tmp / "vis_history.npz", **visual_history_maps(tok.vision))
    for f in sorted(list(tmp.glob("*.npy")) + list(tmp.glob("*.npz"))):
        meta["files"][f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    old = out.with_name(out.name + f".old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    stats["out_dir"] = str(out)
    return stats


def _text_documents(cfg: MultimodalDataConfig, text_tok):
    """(split, ids) for the first `text_documents` non-empty lines of `text_corpus`, every 50th held out."""
    if not cfg.text_documents:
        return
    n = 0
    for path in cfg.text_corpus:
        if not Path(path).is_file():
            raise UserError(path, "text corpus file not found (run `ernie5 data fetch`)")
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                ids = text_tok.encode(line.strip())[:cfg.text_doc_tokens - 1] + [text_tok.eos_id]
                yield ("val" if n % 50 == 49 else "train"), ids
                n += 1
                if n >= cfg.text_documents:
                    return


def read_multimodal_meta(shard_dir: str) -> dict:
    """meta.json of multimodal shards (a one-line UserError when absent, unreadable or not multimodal)."""
    meta_path = Path(shard_dir) / "meta.json"
    if not meta_path.is_file():
        raise UserError(str(meta_path), "no prepared multimodal shards here (run `ernie5 data prepare CONFIG`)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(str(meta_path), f"unreadable shard metadata ({e})") from None
    if meta.get("format") != MULTIMODAL_FORMAT:
        raise UserError(str(meta_path), "not a multimodal shard (text shards have no segments to inspect)")
    return meta


def open_multimodal_split(shard_dir: str, split: str) -> tuple[dict, dict]:
    """(meta, {field: memory-mapped array [rows, seq_len, ...]}) after checking sizes against meta.json."""
    root = Path(shard_dir)
    meta = read_multimodal_meta(shard_dir)
    arrays = {}
    for name, want in meta["files"].items():
        if not name.startswith(split + "."):
            continue
        path = root / name
        if not path.is_file() or path.stat().st_size != want["bytes"]:
            raise UserError(str(path), "shard file missing or truncated")
        arrays[name[len(split) + 1:-4]] = np.load(path, mmap_mode="r")
    if not arrays:
        raise UserError(f"{shard_dir}: {split}", f"no such split (have {', '.join(meta['splits'])})")
    return meta, arrays
