"""Prepared text sources on disk, and reading them back as memory-mapped splits.

A source directory (written by `ernie5.data.prepare`) holds:
  plan.json                  format, the fingerprint of the inputs (tokenizer sha256, source config, files with
                             sizes and mtimes, seed, val_fraction, BPE-dropout, unit_bytes), the work units in
                             order, vocab_size, eos_id and the token dtype (uint16 when the vocabulary fits)
  units-<fp>/NNNNNN.{train,val}.tokens.npy   unit NNNNNN's documents, each followed by EOS, concatenated
  units-<fp>/NNNNNN.{train,val}.docs.npy     int64 start offset of each document in that unit's token file
  units-<fp>/NNNNNN.done.json                written last: records, documents and tokens per split, bad records
                                             (count, first reasons), bytes + sha256 of each of the unit's files
`<fp>` is the first 16 hex digits of the fingerprint's sha256, so outputs of another plan never mix in. A split
is the concatenation of its unit files in unit order; document indices run on across units.

`open_split` refuses a source whose plan has units without a matching done marker (a killed or partial
preparation), checks every file's size (and, with `verify`, its sha256) against its marker, and memory-maps them:
nothing is concatenated in memory. Errors are one-line UserErrors naming the file. Directories in the single-file
format of earlier versions (`meta.json` + `{split}.tokens.npy`) are still read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ernie5.errors import UserError

PLAN = "plan.json"
META = "meta.json"  # multimodal shards and the earlier single-file text format
TEXT_FORMAT = "ernie5-text-units"
TEXT_VERSION = 2
SPLITS = ("train", "val")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Split:
    """One split of a text source: the token stream (EOS-terminated documents) and each document's start."""

    tokens: np.ndarray  # [N] memory-mapped
    doc_starts: np.ndarray  # [D]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_docs(self) -> int:
        return int(self.doc_starts.shape[0])

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int64 [length], document index int64 [length]) of stream positions [start, start + length)."""
        tokens = np.asarray(self.tokens[start:start + length], dtype=np.int64)
        docs = np.searchsorted(self.doc_starts, np.arange(start, start + len(tokens)), side="right") - 1
        return tokens, docs.astype(np.int64)


class ConcatSplit:
    """Splits (one per unit, each starting with a document) read as one stream: `Split`'s interface, with
    windows crossing piece boundaries and document indices counted across pieces."""

    def __init__(self, pieces: list[Split]):
        self.pieces = [p for p in pieces if p.num_tokens > 0]
        self.token_offsets = np.concatenate([[0], np.cumsum([p.num_tokens for p in self.pieces])]).astype(np.int64)
        self.doc_offsets = np.concatenate([[0], np.cumsum([p.num_docs for p in self.pieces])]).astype(np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.token_offsets[-1])

    @property
    def num_docs(self) -> int:
        return int(self.doc_offsets[-1])

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        end = min(start + length, self.num_tokens)
        if start >= end:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        i = int(np.searchsorted(self.token_offsets, start, side="right")) - 1
        tokens, docs, pos = [], [], start
        while pos < end:
            piece, first = self.pieces[i], int(self.token_offsets[i])
            n = min(end - pos, piece.num_tokens - (pos - first))
            t, d = piece.window(pos - first, n)
            tokens.append(t)
            docs.append(d + self.doc_offsets[i])
            pos, i = pos + n, i + 1
        if len(tokens) == 1:
            return tokens[0], docs[0]
        return np.concatenate(tokens), np.concatenate(docs)


# ----------------------------------------------------------------------------------------------- layout, plan, markers

def units_dir(source_dir: str | Path, plan: dict) -> Path:
    return Path(source_dir) / f"units-{plan['fingerprint_sha256'][:16]}"


def unit_file(index: int, split: str, kind: str) -> str:
    return f"{index:06d}.{split}.{kind}.npy"


def marker_name(index: int) -> str:
    return f"{index:06d}.done.json"


def fingerprint_sha256(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _read_json(path: Path, what: str) -> dict:
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(str(path), f"unreadable {what} ({e})") from None
    if not isinstance(out, dict):
        raise UserError(str(path), f"unreadable {what} (not a JSON object)")
    return out


def read_plan(source_dir: str | Path) -> Optional[dict]:
    """The source's plan.json, or None when there is none."""
    path = Path(source_dir) / PLAN
    if not path.is_file():
        return None
    plan = _read_json(path, "shard metadata")
    if plan.get("format") != TEXT_FORMAT or "fingerprint_sha256" not in plan or "units" not in plan:
        raise UserError(str(path), f"unreadable shard metadata (not a {TEXT_FORMAT} plan)")
    if plan.get("version") != TEXT_VERSION:
        raise UserError(str(path), f"shard format version {plan.get('version')} (this ernie5 reads "
                                   f"{TEXT_VERSION}; run `ernie5 data prepare` again)")
    return plan


def read_marker(source_dir: str | Path, plan: dict, index: int) -> Optional[dict]:
    """Unit `index`'s done marker if it exists and belongs to this plan, else None."""
    path = units_dir(source_dir, plan) / marker_name(index)
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("unit") != index \
            or marker.get("fingerprint_sha256") != plan["fingerprint_sha256"]:
        return None
    return marker


def _complete_markers(source_dir: str | Path, plan: dict) -> list[dict]:
    markers = [read_marker(source_dir, plan, i) for i in range(len(plan["units"]))]
    missing = [i for i, m in enumerate(markers) if m is None]
    if missing:
        raise UserError(f"source {plan.get('source', Path(source_dir).name)}",
                        f"{len(missing)} of {len(markers)} units not prepared in {source_dir} (run `ernie5 data "
                        f"prepare` again, or the missing --partition)")
    return markers


def read_meta(shard_dir: str) -> dict:
    """What a prepared directory holds. For a text source: vocab_size, eos_id, dtype, tokenizer_sha256, units,
    bad_records and `splits: {train: {tokens, documents}, val: {...}}` (totals over units); refuses a source with
    unprepared units. A multimodal (or earlier single-file text) directory: its meta.json."""
    plan = read_plan(shard_dir)
    if plan is None:
        path = Path(shard_dir) / META
        if not path.is_file():
            raise UserError(str(Path(shard_dir) / PLAN), "no prepared shards here (run `ernie5 data prepare CONFIG`)")
        return _read_json(path, "shard metadata")
    markers = _complete_markers(shard_dir, plan)
    splits = {s: {"tokens": sum(m["splits"][s]["tokens"] for m in markers),
                  "documents": sum(m["splits"][s]["documents"] for m in markers)} for s in SPLITS}
    return {"format": TEXT_FORMAT, "version": plan["version"], "source": plan["source"],
            "vocab_size": plan["vocab_size"], "eos_id": plan["eos_id"], "dtype": plan["dtype"],
            "tokenizer_sha256": plan["fingerprint"]["tokenizer_sha256"], "units": len(plan["units"]),
            "records": sum(m["records"] for m in markers), "bad_records": sum(m["bad_records"] for m in markers),
            "splits": splits}


def check_file(path: Path, want: Optional[dict], verify: bool) -> None:
    """Size (and with `verify` sha256) of one shard file against its recorded {bytes, sha256}."""
    if want is None or not path.is_file():
        raise UserError(str(path), "shard file missing")
    size = path.stat().st_size
    if size != want["bytes"]:
        raise UserError(str(path), f"truncated or resized shard ({size} bytes, its record says {want['bytes']})")
    if verify and sha256_file(path) != want["sha256"]:
        raise UserError(str(path), "shard checksum mismatch (file corrupted)")


def _load(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise UserError(str(path), f"unreadable shard ({e})") from None
    if arr.ndim != 1:
        raise UserError(str(path), f"unreadable shard (shape {arr.shape}, expected one dimension)")
    return arr


def open_split(shard_dir: str, split: str, verify: bool = True) -> ConcatSplit | Split:
    """One split of a prepared text source, memory-mapped unit by unit, after checking every file's size (and,
    with `verify`, checksum) against its unit's done marker."""
    if split not in SPLITS:
        raise UserError(f"{shard_dir}: {split}", f"no such split (have {', '.join(SPLITS)})")
    plan = read_plan(shard_dir)
    if plan is None:
        return _open_single_file_split(shard_dir, split, verify)
    markers = _complete_markers(shard_dir, plan)
    root = units_dir(shard_dir, plan)
    pieces = []
    for i, marker in enumerate(markers):
        arrays = []
        for kind in ("tokens", "docs"):
            name = unit_file(i, split, kind)
            check_file(root / name, marker["files"].get(name), verify)
            arrays.append(_load(root / name))
        pieces.append(Split(tokens=arrays[0], doc_starts=arrays[1]))
    return ConcatSplit(pieces)


def _open_single_file_split(shard_dir: str, split: str, verify: bool) -> Split:
    """The format before work units: `{split}.tokens.npy`, `{split}.docs.npy`, sizes in meta.json."""
    meta = read_meta(shard_dir)
    arrays = []
    for kind in ("tokens", "docs"):
        name = f"{split}.{kind}.npy"
        check_file(Path(shard_dir) / name, meta.get("files", {}).get(name), verify)
        arrays.append(_load(Path(shard_dir) / name))
    return Split(tokens=arrays[0], doc_starts=arrays[1])
