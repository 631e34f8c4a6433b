"""WebDataset tar shards as the input of multimodal preparation (`webdataset:` in a `kind: multimodal` config).

A shard is a plain tar file whose members are grouped into samples by WebDataset's convention: the key is the
member name up to the first dot of its base name, the rest is the extension (`000123.jpg`, `000123.json`), and a
sample's members are consecutive. Reading and grouping are `webdataset.tariterators` (`tar_file_expander`,
`group_by_keys`), streamed: one sample's bytes are in memory at a time. Recognised members (lower-cased):

  image  jpg | jpeg | png | webp        text   txt (UTF-8), or json (an object; the text in `text_field`)
  audio  wav | flac | mp3 | ogg         video  mp4 | npy (uint8 frames)

Other members are ignored. Each sample becomes one document per task that its members allow (`tasks` in the
config; empty: the defaults of `DEFAULT_TASKS`); see `TASKS` for the layouts. A sample goes to val when a seeded
CRC-32 of its key is below `val_fraction x 2^32` (`ernie5.data.prepare.is_held_out` on the key), so all documents
of a sample share a split and the split never depends on shard boundaries.

Media are handed on undecoded, as raw segments `{"kind", "role", "bytes", "name": "SHARD:KEY.EXT"}` for
`SegmentTokenizer`; text as `{"kind": "text", "role", "text"}`. Problems with one sample (no text, bad JSON, no
usable media) are `UserError("SHARD:KEY", reason)`; problems with the tar itself (a damaged member, a truncated
archive) are reported through `on_error` as `SHARD: reason`, and the samples before the damage are kept.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ernie5.config.schema import join, require
from ernie5.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("wav", "flac", "mp3", "ogg")
VIDEO_EXTS = ("mp4", "npy")

# task -> (media kind, layout); "understand": media (role input), sep, text;  "generate": text, media (role target)
TASKS = {
    "caption": ("image", "understand"),
    "t2i": ("image", "generate"),
    "asr": ("audio", "understand"),
    "tts": ("audio", "generate"),
    "t2v": ("video", "generate"),
    "v2t": ("video", "understand"),
}
DEFAULT_TASKS = ("caption", "t2i", "asr", "tts", "t2v")  # v2t only when asked for


@dataclass
class WebDatasetConfig:
    """Tar shards of samples (see the module docstring)."""

    paths: list[str] = field(default_factory=list)  # globs of .tar files, expanded and sorted, in this order
    tasks: list[str] = field(default_factory=list)  # of TASKS; empty: DEFAULT_TASKS
    text_field: str = "caption"  # the text of a sample's .json member (a .txt member wins when both exist)
    val_fraction: float = 0.01  # samples held out by a seeded CRC-32 of their key
    seed: int = 0

    def validate(self, path: str) -> None:
        require(bool(self.paths), join(path, "paths"), "name at least one tar shard (a path or glob)")
        for i, t in enumerate(self.tasks):
            require(t in TASKS, join(path, f"tasks[{i}]"), f"{t!r} is not one of {', '.join(TASKS)}")
        require(bool(self.text_field), join(path, "text_field"), "must not be empty")
        require(0.0 <= self.val_fraction < 1.0, join(path, "val_fraction"),
                f"{self.val_fraction} must be in [0, 1)")

    @property
    def active_tasks(self) -> tuple[str, ...]:
        return tuple(self.tasks) if self.tasks else DEFAULT_TASKS


def resolve_shards(cfg: WebDatasetConfig, where: str) -> list[str]:
    """The shard files of `cfg.paths` (each glob sorted, in config order, each file once)."""
    out, seen = [], set()
    for i, pattern in enumerate(cfg.paths):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise UserError(join(where, f"paths[{i}]"), f"{pattern!r} matches no file")
        for m in matches:
            if m not in seen:
                seen.add(m)
                out.append(m)
    return out


def shard_samples(shard: str, on_error: Callable[[str], None]) -> Iterator[dict]:
    """The samples of one tar shard, streamed: dicts {"__key__", ext: bytes, ...} (webdataset's grouping).
    Damage to the tar is reported as one `on_error("SHARD: reason")` line per problem, never raised."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    damaged = False

    def handler(exn: Exception) -> bool:
        nonlocal damaged
        if not damaged:  # the reader usually fails twice on one cut: report it once
            text = str(exn.args[0]) if exn.args else type(exn).__name__
            on_error(f"{shard}: damaged tar ({text.split(' @ ')[0]}); samples after it are lost")
        damaged = True
        return True

    try:
        f = open(shard, "rb")
    except OSError as e:
        raise UserError(shard, f"cannot open shard ({e.strerror or e})") from None
    with f:
        files = tar_file_expander([{"url": shard, "stream": f}], handler=handler)
        yield from group_by_keys(files, handler=handler)
    reason = "" if damaged else _tar_end_problem(shard)
    if reason:
        on_error(f"{shard}: {reason}")


def _tar_end_problem(shard: str) -> str:
    """A reason when an uncompressed tar lacks its end-of-archive blocks (a truncated copy: the stream reader
    stops quietly at a cut header), else ""."""
    try:
        with open(shard, "rb") as f:
            if f.read(2) in (b"\x1f\x8b", b"BZ", b"\xfd7", b"(\xb5"):  # gzip, bzip2, xz, zstd: not checkable cheaply
                return ""
            size = f.seek(0, os.SEEK_END)
            if size % 512:
                return f"truncated tar ({size} bytes is not a whole number of 512-byte blocks)"
            f.seek(max(size - 1024, 0))
            if size < 1024 or f.read(1024).strip(b"\0"):
                return "truncated tar (no end-of-archive blocks)"
    except OSError as e:
        return f"unreadable tar ({e.strerror or e})"
    return ""


def _first(sample: dict, exts: tuple[str, ...]) -> str | None:
    return next((e for e in exts if e in sample), None)


def sample_text(sample: dict, where: str, text_field: str) -> str:
    """The sample's text: its .txt member, else its .json member's `text_field`."""
    if "txt" in sample:
        try:
            text = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(where, f"txt member is not UTF-8 (byte {e.start})") from None
    elif "json" in sample:
        try:
            rec = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(where, f"json member does not parse ({type(e).__name__}: {e})") from None
        if not isinstance(rec, dict) or text_field not in rec:
            raise UserError(where, f"json member has no {text_field!r} field")
        text = rec[text_field]
        if not isinstance(text, str):
            raise UserError(where, f"json field {text_field!r} is a {type(text).__name__}, not a string")
    else:
        raise UserError(where, "no text (no .txt or .json member)")
    text = text.strip()
    if not text:
        raise UserError(where, "empty text")
    return text


def sample_documents(sample: dict, shard: str, cfg: WebDatasetConfig) -> list[tuple[str, list[dict]]]:
    """[(task, raw segments)] of one sample, in `cfg.active_tasks` order; UserError("SHARD:KEY", reason) when the
    sample gives no document."""
    key = sample["__key__"]
    where = f"{shard}:{key}"
    media = {"image": _first(sample, IMAGE_EXTS), "audio": _first(sample, AUDIO_EXTS),
             "video": _first(sample, VIDEO_EXTS)}
    tasks = [t for t in cfg.active_tasks if media[TASKS[t][0]] is not None]
    if not tasks:
        have = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "nothing"
        raise UserError(where, f"no media member for the tasks {', '.join(cfg.active_tasks)} (members: {have})")
    text = sample_text(sample, where, cfg.text_field)
    docs = []
    for task in tasks:
        kind, layout = TASKS[task]
        ext = media[kind]
        if not sample[ext]:
            raise UserError(f"{where}.{ext}", "empty member")
        seg = {"kind": kind, "bytes": sample[ext], "name": f"{where}.{ext}"}
        txt = {"kind": "text", "role": "target", "text": text}
        if layout == "understand":
            docs.append((task, [{**seg, "role": "input"}, {"kind": "sep", "role": "target"}, txt]))
        else:
            docs.append((task, [txt, {**seg, "role": "target"}]))
    return docs


def held_out(key: str, cfg: WebDatasetConfig) -> bool:
    """Whether sample `key` goes to val (a seeded CRC-32 of the key, as `is_held_out` splits text documents)."""
    from ernie5.data.prepare import is_held_out

    return is_held_out([key], cfg.seed, cfg.val_fraction)[0]
