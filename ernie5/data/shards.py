"""Token shards: `DIR/{split}.tokens.npy` (all documents, EOS-terminated, concatenated), `DIR/{split}.docs.npy`
(start offset of each document) and `DIR/meta.json` (sizes and sha256 of every file, tokenizer identity).

Shards are memory-mapped at training time. A shard that is missing, truncated or altered fails `open_split`
with a one-line UserError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ernie5.errors import UserError

META = "meta.json"


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


def write_shards(out_dir: str, splits: dict[str, list[list[int]]], eos_id: int, vocab_size: int,
                 extra_meta: dict) -> None:
    """Write all splits into a temp dir, then swap it in: the shard dir is either old or wholly new."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    meta = {"format": 1, "vocab_size": vocab_size, "eos_id": eos_id, "dtype": np.dtype(dtype).name,
            "splits": {}, "files": {}, **extra_meta}
    for name, docs in splits.items():
        lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if docs else np.zeros(0, np.int64)
        flat = np.empty(int(lengths.sum()), dtype=dtype)
        for s, d in zip(starts, docs):
            flat[s:s + len(d)] = d
            flat[s + len(d)] = eos_id
        np.save(tmp / f"{name}.tokens.npy", flat)
        np.save(tmp / f"{name}.docs.npy", starts)
        meta["splits"][name] = {"tokens": int(flat.size), "documents": len(docs)}
    for f in sorted(tmp.glob("*.npy")):
        meta["files"][f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    (tmp / META).write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    old = out.with_name(out.name + f".old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def read_meta(shard_dir: str) -> dict:
    path = Path(shard_dir) / META
    if not path.is_file():
        raise UserError(str(path), "no prepared shards here (run `ernie5 data prepare CONFIG`)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(str(path), f"unreadable shard metadata ({e})") from None


def open_split(shard_dir: str, split: str, verify: bool = True) -> Split:
    """Memory-map one split after checking sizes (and, with `verify`, checksums) against meta.json."""
    meta = read_meta(shard_dir)
    arrays = []
    for kind in ("tokens", "docs"):
        name = f"{split}.{kind}.npy"
        path = Path(shard_dir) / name
        want = meta.get("files", {}).get(name)
        if want is None or not path.is_file():
            raise UserError(str(path), "shard file missing")
        if path.stat().st_size != want["bytes"]:
            raise UserError(str(path), f"truncated or resized shard ({path.stat().st_size} bytes, "
                                       f"meta.json says {want['bytes']})")
        if verify and sha256_file(path) != want["sha256"]:
            raise UserError(str(path), "shard checksum mismatch (file corrupted)")
        try:
            arrays.append(np.load(path, mmap_mode="r"))
        except (ValueError, OSError) as e:
            raise UserError(str(path), f"unreadable shard ({e})") from None
    return Split(tokens=arrays[0], doc_starts=arrays[1])
