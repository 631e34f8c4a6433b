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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ernie5.config.schema import build, join, require
from ernie5.config.yaml_io import apply_overrides, load_yaml
from ernie5.constants import MULTIMODAL_FORMAT
from ernie5.data.media_tokenize import SegmentTokenizer, visual_history_maps
from ernie5.data.sequence import SPECIALS, Segment, build_document, pack_documents, special_ids
from ernie5.data.shards import sha256_file
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


def prepare_multimodal(config_path: str, overrides=(), log=print) -> dict:
    cfg = load_multimodal_config(config_path, overrides)
    manifest = Path(cfg.manifest)
    if not manifest.is_file():
        raise UserError(str(manifest), "manifest not found (run `ernie5 data fetch --multimodal`)")
    tok = SegmentTokenizer(cfg.text_tokenizer, cfg.vision_tokenizer, cfg.audio_tokenizer, manifest.parent)
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
