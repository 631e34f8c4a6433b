"""`ernie5 data prepare CONFIG` for `kind: multimodal` configs: tokenise mixed text / image / video / audio
documents offline (the tokenizers run apart from the backbone) and write packed train / val rows.

Inputs (exactly one; docs/media.md):
- `manifest`: JSON lines `{"id", "split", "segments": [{"kind": text|image|video|audio|sep, "text" | "path",
  "role": input|target}]}`, media paths relative to the manifest; the record's `split` ("val" or else train).
- `webdataset`: tar shards of samples (`ernie5.data.webdataset_source`): each sample becomes one document per
  task its members allow; its split is a seeded CRC-32 of its key.
A document (manifest line) or sample whose media is missing or corrupt is skipped with one line naming it (in
meta.json's `skipped`); the rest is prepared. Every document ends with the text tokenizer's EOS. Optionally
`text_corpus` files (one document per line) add `text_documents` text-only documents, cut to `text_doc_tokens`.

Work units: the manifest is cut into units of `manifest_unit_lines` consecutive lines (0: the whole manifest is
one unit), each tar shard is one unit. `workers` spawned processes (each loads the three
tokenizers once) tokenise whole units and stream each document to the unit's files as soon as it is built, so
memory holds one sample's raw media and one document at a time. Per unit, `WORK/units-<fp>/` gets
`NNNNNN.{field}.npy` (the unit's documents concatenated: every field of `sequence.FIELDS` and `und_table`),
`NNNNNN.docs.npy` (int64 [D, 3]: positions, understanding-table rows, 1 if val), `NNNNNN.samples.jsonl` (per
document: where it came from and how each picture / video was fitted) and, last, `NNNNNN.done.json`
(the unit's input signature, document counts, skipped lines, sizes and sha256 of its files). WORK is
`work_dir`, by default `OUT_DIR.work`; `<fp>` is the start of the sha256 of the fingerprint (tokenizer file
hashes, shard format, the settings that change a unit's documents), and `plan.json` holds the plan. A unit is
done when its marker matches the fingerprint and its input signature (size and mtime of a tar shard; a manifest
unit's line range, the hash of its lines and the size and mtime of every media file they name), so running the
command again redoes only missing or changed units.
`partition=(I, N)` prepares the units with index % N == I.

Packing: once every unit is done (in whichever run finishes the last one), the documents of each split (units
in order, then the text documents) are shuffled with a fixed seed, packed greedily into rows (`pack_documents`,
PACK_ROWS rows per call, the unit arrays memory-mapped) and written to a fresh directory that replaces `out_dir`
atomically. The result depends only on the inputs: byte-identical for any workers and partitions, and but for
meta.json's unit count for any `manifest_unit_lines` (documents keep their manifest order whatever the units).

Shard: `DIR/{split}.{field}.npy` (fields of `sequence.FIELDS` + `doc`, each [rows, seq_len, ...]; plus
`{split}.und_table.npy` [M, K, F]), `DIR/vis_history.npz` (the linear map from earlier scales' sign bits to the
visual inputs, see `visual_history_maps`: training uses it to corrupt the visual history by bit flips) and
`DIR/{split}.samples.jsonl` (one line per packed document, in row order: `row`, `offset` and `length` in the row,
`source` (manifest:line, shard:key#task, or text), and `media`: per picture / video its bucket, source size, crop
box, latent grid and scale schedule) and `DIR/meta.json` (sizes, sha256, tokenizer identities, special-token ids,
feature sizes, the bucket table, skipped documents).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import socket
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

import numpy as np

from ernie5.config.schema import build, join, require
from ernie5.config.yaml_io import apply_overrides, load_yaml
from ernie5.constants import MULTIMODAL_FORMAT
from ernie5.data.buckets import BucketConfig
from ernie5.data.media_tokenize import SegmentTokenizer, visual_history_maps
from ernie5.data.sequence import FIELDS, SPECIALS, UND_PATCHES, Segment, build_document, pack_documents, special_ids
from ernie5.data.shards import SPLITS, fingerprint_sha256, marker_name, sha256_file
from ernie5.data.webdataset_source import (WebDatasetConfig, held_out, resolve_shards, sample_documents,
                                           shard_samples)
from ernie5.errors import UserError

UNITS_FORMAT = "ernie5-multimodal-units"
UNITS_VERSION = 4  # 2: the multimodal-3 row layout; 3: per-document samples.jsonl; 4: manifest line-range units
PACK_ROWS = 256  # rows per pack_documents call while packing
OPEN_UNITS = 64  # units whose files stay memory-mapped at once while packing (each holds ~14 maps)
UNIT_ARRAYS = FIELDS + ("und_table",)


@dataclass
class MultimodalDataConfig:
    """Inputs, tokenizers and row length of the multimodal shards."""

    kind: Literal["multimodal"] = "multimodal"
    manifest: str = ""  # a JSONL manifest ...
    webdataset: Optional[WebDatasetConfig] = None  # ... or WebDataset tar shards: exactly one of the two
    out_dir: str = "data/shards/digits_world"
    work_dir: str = ""  # per-unit outputs (resumable); "" = OUT_DIR.work
    text_tokenizer: str = "tokenizers/demo_text.model"
    vision_tokenizer: str = "tokenizers/digits_vision_b4.safetensors"
    audio_tokenizer: str = "tokenizers/digits_audio.safetensors"
    seq_len: int = 512
    max_documents: int = 0  # manifest: read only its first N lines (0: all)
    manifest_unit_lines: int = 10000  # manifest lines per work unit (what `--workers` spread); 0: one unit
    text_corpus: list[str] = field(default_factory=list)  # plain-text files mixed in as text-only documents
    text_documents: int = 0  # how many of them (0: none)
    text_doc_tokens: int = 256  # each cut to at most this many tokens
    buckets: Optional[BucketConfig] = None  # resolution buckets for pictures / frames (None: the tokenizer's square)

    def validate(self, path: str) -> None:
        require(bool(self.manifest) != (self.webdataset is not None), join(path, "manifest"),
                "name exactly one input: `manifest` (a JSONL manifest) or `webdataset` (tar shards)")
        require(self.seq_len >= 8, join(path, "seq_len"), "must be >= 8")
        require(self.max_documents >= 0, join(path, "max_documents"), "must be >= 0")
        require(self.manifest_unit_lines >= 0, join(path, "manifest_unit_lines"), "must be >= 0 (0: one unit)")
        require(self.text_documents >= 0, join(path, "text_documents"), "must be >= 0")
        require(not self.text_documents or 8 <= self.text_doc_tokens < self.seq_len, join(path, "text_doc_tokens"),
                f"{self.text_doc_tokens} must be in [8, seq_len)")

    @property
    def work_root(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.out_dir + ".work")


def load_multimodal_config(path: str, overrides=()) -> MultimodalDataConfig:
    return build(MultimodalDataConfig, apply_overrides(load_yaml(Path(path)), list(overrides)), "")


# ------------------------------------------------------------------------------------------------------ entry point

def prepare_multimodal(config_path: str, overrides=(), log: Callable[[str], None] = print, workers: int = 1,
                       partition: tuple[int, int] = (0, 1)) -> dict:
    """Prepare this partition's units, then pack the shards if every unit is done (see the module docstring).
    Returns stats: units (total, done now, already done, left to other partitions, still missing), whether the
    shards were packed and, if so, rows / documents / too-long documents per split and skipped records."""
    from ernie5.data.prepare import check_partition

    if workers < 1:
        raise UserError("--workers", f"{workers} must be >= 1")
    check_partition(partition)
    part, nparts = partition
    cfg = load_multimodal_config(config_path, overrides)
    if cfg.manifest and not Path(cfg.manifest).is_file():
        raise UserError(cfg.manifest, "manifest not found (run `ernie5 data fetch --multimodal`)")
    tok = SegmentTokenizer(cfg.text_tokenizer, cfg.vision_tokenizer, cfg.audio_tokenizer, _media_root(cfg),
                           _bucket_sizes(cfg), _crop(cfg))
    plan = _plan(cfg)
    udir = _install_plan(cfg.work_root, plan)
    n = len(plan["units"])
    signatures = [_signature(u) for u in plan["units"]]
    markers: dict[int, dict] = {}
    jobs = []
    stats = {"units": n, "units_done": 0, "units_skipped": 0, "units_other_partitions": 0}
    for i, unit in enumerate(plan["units"]):
        m = _unit_done(udir, plan, i, signatures[i])
        if i % nparts != part:
            stats["units_other_partitions"] += 1
            if m is not None:
                markers[i] = m
            continue
        if m is not None:
            markers[i] = m
            stats["units_skipped"] += 1
            continue
        jobs.append({"index": i, "unit": unit, "signature": signatures[i], "units_dir": str(udir),
                     "fingerprint_sha256": plan["fingerprint_sha256"],
                     "webdataset": dataclasses.asdict(cfg.webdataset) if cfg.webdataset else None})
    for marker in _run(jobs, tok, cfg, workers):
        markers[marker["unit"]] = marker
        stats["units_done"] += 1
        docs = marker["documents"]
        log(f"unit {marker['unit'] + 1}/{n} {marker['path']}: {docs['train']} train + {docs['val']} val documents, "
            f"{len(marker['skipped'])} skipped")
        for line in marker["skipped"]:
            log(f"skipped {line}")
    missing = [i for i in range(n) if i not in markers]
    stats["units_missing"] = len(missing)
    stats["out_dir"] = cfg.out_dir
    if missing:
        stats["packed"] = False
        log(f"{len(missing)} of {n} units are not prepared yet (other partitions); the run that finishes the last "
            "one packs the shards (or run the command again without --partition)")
        return stats
    stats.update(_pack(cfg, plan, udir, [markers[i] for i in range(n)], tok, log))
    stats["packed"] = True
    return stats


def _media_root(cfg: MultimodalDataConfig) -> Path:
    return Path(cfg.manifest).parent if cfg.manifest else Path(".")


# ------------------------------------------------------------------------------------------------------------ plan

def _bucket_sizes(cfg: MultimodalDataConfig) -> Optional[list]:
    return None if cfg.buckets is None else [[int(h), int(w)] for h, w in cfg.buckets.sizes]


def _crop(cfg: MultimodalDataConfig) -> str:
    return "center" if cfg.buckets is None else cfg.buckets.crop


def _plan(cfg: MultimodalDataConfig) -> dict:
    if cfg.manifest:
        units = _manifest_units(cfg)
    else:
        units = [{"kind": "tar", "path": p} for p in resolve_shards(cfg.webdataset, "webdataset")]
    w = cfg.webdataset
    fingerprint = {
        "format": UNITS_FORMAT, "version": UNITS_VERSION, "shard_format": MULTIMODAL_FORMAT,
        "tokenizers": {"text": _sha(cfg.text_tokenizer), "vision": _sha(cfg.vision_tokenizer),
                       "vision_config": _sha(str(Path(cfg.vision_tokenizer).with_suffix(".json"))),
                       "audio": _sha(cfg.audio_tokenizer),
                       "audio_config": _sha(str(Path(cfg.audio_tokenizer).with_suffix(".json")))},
        "max_documents": cfg.max_documents if cfg.manifest else 0,
        "webdataset": None if w is None else {"tasks": list(w.active_tasks), "text_field": w.text_field,
                                              "val_fraction": w.val_fraction, "seed": w.seed},
        "buckets": _bucket_sizes(cfg), "crop": _crop(cfg),
    }
    return {"format": UNITS_FORMAT, "version": UNITS_VERSION, "fingerprint": fingerprint,
            "fingerprint_sha256": fingerprint_sha256(fingerprint), "units": units}


def _manifest_units(cfg: MultimodalDataConfig) -> list[dict]:
    """The manifest's work units, from one pass over it: runs of `manifest_unit_lines` lines, each with `lines`
    [first, last] (1-based, inclusive) and the byte `offset` of its first line, so a unit seeks to its lines
    instead of reading the file from the top. Lines end at b"\n". At least one unit, so an empty manifest still
    packs."""
    per = cfg.manifest_unit_lines
    n, starts = 0, []
    with open(cfg.manifest, "rb") as f:
        while not cfg.max_documents or n < cfg.max_documents:
            offset = f.tell()
            if not f.readline():
                break
            if n == 0 or (per and n % per == 0):
                starts.append(offset)
            n += 1
    step = per or max(n, 1)
    return [{"kind": "manifest", "path": cfg.manifest, "lines": [i * step + 1, min((i + 1) * step, n)],
             "offset": off} for i, off in enumerate(starts or [0])]


def _manifest_lines(unit: dict) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a manifest unit's lines."""
    first, last = unit["lines"]
    with open(unit["path"], "rb") as f:
        f.seek(unit["offset"])
        for lineno in range(first, last + 1):
            yield lineno, f.readline()


def _sha(path: str) -> Optional[str]:
    return sha256_file(Path(path)) if Path(path).is_file() else None


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _units_dir(root: Path, plan: dict) -> Path:
    return root / f"units-{plan['fingerprint_sha256'][:16]}"


def _install_plan(root: Path, plan: dict) -> Path:
    """Write plan.json (the same bytes from every partition), drop other plans' unit directories."""
    root.mkdir(parents=True, exist_ok=True)
    data = _json_bytes(plan)
    path = root / "plan.json"
    if not (path.is_file() and path.read_bytes() == data):
        _atomic_write(path, data)
    mine = _units_dir(root, plan)
    for old in root.glob("units-*"):
        if old.is_dir() and old != mine:
            shutil.rmtree(old, ignore_errors=True)
    mine.mkdir(exist_ok=True)
    return mine


def _stat(path: Path) -> list:
    try:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, -1]


def _signature(unit: dict) -> dict:
    """What a unit's documents depend on besides the plan. A tar shard: its size and mtime. A manifest unit: its
    line range, the sha256 of its lines and the size and mtime of every media file they name (editing other
    lines of the manifest, or appending to it, leaves the unit done; a fixed or replaced image redoes it)."""
    import hashlib

    if unit["kind"] != "manifest":
        return {"path": unit["path"], "stat": _stat(Path(unit["path"]))}
    lines_h, media_h = hashlib.sha256(), hashlib.sha256()
    root = Path(unit["path"]).parent
    for _, raw in _manifest_lines(unit):
        lines_h.update(raw)
        try:
            segments = json.loads(raw)["segments"]
            names = [s["path"] for s in segments if isinstance(s, dict) and isinstance(s.get("path"), str)]
        except (ValueError, KeyError, TypeError):
            continue
        for name in names:
            media_h.update(json.dumps([name, _stat(root / name)]).encode())
    return {"path": unit["path"], "lines": list(unit["lines"]), "lines_sha256": lines_h.hexdigest(),
            "media_sha256": media_h.hexdigest()}


def _unit_done(udir: Path, plan: dict, index: int, signature: dict) -> Optional[dict]:
    """The unit's marker when it belongs to this plan and input and its files have their recorded sizes."""
    try:
        marker = json.loads((udir / marker_name(index)).read_text(encoding="utf-8"))
        if marker.get("unit") != index or marker.get("fingerprint_sha256") != plan["fingerprint_sha256"] \
                or marker.get("input") != signature:
            return None
        for name, want in marker["files"].items():
            if (udir / name).stat().st_size != want["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return marker


# ------------------------------------------------------------------------------------------------------ one unit

def _templates(tok: SegmentTokenizer) -> dict:
    """{array: (dtype, trailing shape)} of a unit's files, from a probe document (so they follow
    `build_document`'s layout) and the understanding-feature sizes."""
    probe = build_document([Segment("text", "target", ids=[0])], tok.text.vocab_size, tok.bits, tok.levels)
    out = {k: (probe[k].dtype, probe[k].shape[1:]) for k in FIELDS}
    und_cnn, und_pix = tok.und_dims
    out["und_table"] = (np.dtype(np.float32), (UND_PATCHES, und_cnn + und_pix))
    return out


class _UnitWriter:
    """Appends documents to one unit's arrays (temporary raw files: memory holds one document), then writes them
    as `.npy` files under temporary names renamed into place."""

    def __init__(self, out: Path, index: int, templates: dict):
        self.out, self.index, self.templates = out, index, templates
        self.raw = {k: tempfile.NamedTemporaryFile(dir=out, prefix=f".{index:06d}.{k}.", suffix=".tmp")
                    for k in templates}
        self.rows = {k: 0 for k in templates}
        self.docs: list[tuple[int, int, int]] = []  # (positions, und rows, is val)
        self.samples = tempfile.NamedTemporaryFile(dir=out, prefix=f".{index:06d}.samples.", suffix=".tmp")

    def add(self, doc: dict, val: bool, source: str, segments: list[Segment]) -> None:
        """Append one document; `source` names where it came from, `segments` its pieces (their fit records)."""
        und = doc.get("und_table")
        for k, (dtype, trail) in self.templates.items():
            if k == "und_table" and und is None:
                continue
            arr = np.ascontiguousarray(doc[k], dtype=dtype)
            if arr.shape[1:] != trail:
                raise ValueError(f"{k}: document array {arr.shape} does not match the unit layout {trail}")
            self.raw[k].write(arr.tobytes())
            self.rows[k] += arr.shape[0]
        self.docs.append((len(doc["token"]), 0 if und is None else len(und), int(val)))
        record = {"source": source, "media": [{"segment": i, "kind": s.kind, "role": s.role, **s.meta}
                                              for i, s in enumerate(segments) if s.meta is not None]}
        self.samples.write(_jsonl(record))

    def documents(self) -> dict:
        val = sum(d[2] for d in self.docs)
        return {"train": len(self.docs) - val, "val": val}

    def finish(self) -> dict:
        """Write the unit's `.npy` files; {file name: {bytes, sha256}}."""
        files = {}
        for k, (dtype, trail) in self.templates.items():
            raw = self.raw[k]
            raw.flush()
            raw.seek(0)
            name = f"{self.index:06d}.{k}.npy"
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                      "shape": (self.rows[k], *trail)}
            fd, tmp = tempfile.mkstemp(dir=self.out, prefix=f".{self.index:06d}.{k}.npy.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.lib.format.write_array_header_1_0(f, header)
                shutil.copyfileobj(raw, f, 1 << 22)
            os.replace(tmp, self.out / name)
            raw.close()
            files[name] = {"bytes": (self.out / name).stat().st_size, "sha256": sha256_file(self.out / name)}
        name = f"{self.index:06d}.docs.npy"
        buf = _npy_bytes(np.array(self.docs, np.int64).reshape(-1, 3))
        _atomic_write(self.out / name, buf)
        files[name] = {"bytes": len(buf), "sha256": sha256_file(self.out / name)}
        self.samples.flush()
        self.samples.seek(0)
        name = f"{self.index:06d}.samples.jsonl"
        _atomic_write(self.out / name, self.samples.read())
        self.samples.close()
        files[name] = {"bytes": (self.out / name).stat().st_size, "sha256": sha256_file(self.out / name)}
        return files


def _jsonl(record: dict) -> bytes:
    return (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def prepare_unit(job: dict, tok: SegmentTokenizer) -> dict:
    """Tokenise one unit into its files and done marker; returns the marker."""
    out, index = Path(job["units_dir"]), job["index"]
    (out / marker_name(index)).unlink(missing_ok=True)  # its files are about to be replaced
    for stale in out.glob(f".{index:06d}.*.tmp"):  # left by a killed run of this unit (units are never shared)
        stale.unlink(missing_ok=True)
    writer = _UnitWriter(out, index, _templates(tok))
    skipped: list[str] = []
    eos = Segment("text", "target", ids=[tok.text.eos_id])
    if job["unit"]["kind"] == "manifest":
        records = _manifest_unit(job, tok, eos, writer, skipped)
    else:
        records = _tar_unit(job, tok, eos, writer, skipped)
    marker = {"unit": index, "fingerprint_sha256": job["fingerprint_sha256"], "input": job["signature"],
              "kind": job["unit"]["kind"], "path": job["unit"]["path"], "records": records,
              "documents": writer.documents(), "skipped": skipped, "files": writer.finish()}
    _atomic_write(out / marker_name(index), _json_bytes(marker))
    return marker


def _document(segs: list[Segment], tok: SegmentTokenizer) -> dict:
    return build_document(segs, tok.text.vocab_size, tok.bits, tok.levels)


def _manifest_unit(job: dict, tok: SegmentTokenizer, eos: Segment, writer: _UnitWriter, skipped: list) -> int:
    manifest = Path(job["unit"]["path"])
    records = 0
    for lineno, raw in _manifest_lines(job["unit"]):
        records += 1
        try:
            rec = json.loads(raw.decode("utf-8"))
            segs = [tok(s) for s in rec["segments"]] + [eos]
        except UserError as e:
            skipped.append(f"{manifest}:{lineno}: {e.where}: {e.reason}")
            continue
        except (ValueError, KeyError, TypeError) as e:
            skipped.append(f"{manifest}:{lineno}: malformed record ({type(e).__name__}: {e})")
            continue
        writer.add(_document(segs, tok), rec.get("split") == "val", f"{manifest}:{lineno}", segs)
    return records


def _tar_unit(job: dict, tok: SegmentTokenizer, eos: Segment, writer: _UnitWriter, skipped: list) -> int:
    wcfg = WebDatasetConfig(**job["webdataset"])
    shard = job["unit"]["path"]
    records = 0
    for sample in shard_samples(shard, skipped.append):
        records += 1
        key = sample["__key__"]
        try:
            docs = [(task, [tok(s) for s in segs] + [eos]) for task, segs in sample_documents(sample, shard, wcfg)]
        except UserError as e:
            prefix = f"{shard}:{key}"
            skipped.append(f"{e.where}: {e.reason}" if e.where.startswith(prefix) else
                           f"{prefix}: {e.where}: {e.reason}")
            continue
        val = held_out(key, wcfg)
        for task, segs in docs:
            writer.add(_document(segs, tok), val, f"{shard}:{key}#{task}", segs)
    return records


_TOK: Optional[SegmentTokenizer] = None  # the worker process's tokenizers


def _init_worker(text: str, vision: str, audio: str, root: str, buckets, crop: str) -> None:
    from ernie5.env import setup

    setup()
    global _TOK
    _TOK = SegmentTokenizer(text, vision, audio, Path(root), buckets, crop)


def _work(job: dict) -> tuple:
    """Pool entry: UserErrors come back as values (their two-argument constructor does not survive pickling)."""
    try:
        return prepare_unit(job, _TOK), None
    except UserError as e:
        return None, (e.where, e.reason)


def _run(jobs: list[dict], tok: SegmentTokenizer, cfg: MultimodalDataConfig, workers: int) -> Iterator[dict]:
    """Markers of the prepared units: in this process for one worker, else in spawned processes."""
    if not jobs:
        return
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            yield prepare_unit(job, tok)
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(cfg.text_tokenizer, cfg.vision_tokenizer,
                                                                  cfg.audio_tokenizer, str(_media_root(cfg)),
                                                                  _bucket_sizes(cfg), _crop(cfg)))
    try:
        for future in as_completed([pool.submit(_work, job) for job in jobs]):
            marker, err = future.result()
            if err is not None:
                raise UserError(*err)
            yield marker
    except BrokenProcessPool:
        raise UserError("data prepare", "a worker process died (out of memory? killed?); finished units are kept: "
                                        "run the same command again") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------------------ pack

class _UnitDocs:
    """One prepared unit's documents: the index table in memory, the arrays memory-mapped on demand."""

    def __init__(self, udir: Path, index: int):
        self.udir, self.index = udir, index
        table = np.load(udir / f"{index:06d}.docs.npy")
        self.lengths, self.und_rows, self.val = table[:, 0], table[:, 1], table[:, 2].astype(bool)
        self.starts = np.cumsum(self.lengths) - self.lengths
        self.und_starts = np.cumsum(self.und_rows) - self.und_rows
        self.samples_path = udir / f"{index:06d}.samples.jsonl"  # one JSON line a document; memory keeps offsets
        with open(self.samples_path, "rb") as f:
            self.sample_starts = np.cumsum([0] + [len(line) for line in f])

    def sample(self, j: int) -> dict:
        """Document j's record (source, fitted media) from the unit's samples.jsonl."""
        with open(self.samples_path, "rb") as f:
            f.seek(int(self.sample_starts[j]))
            return json.loads(f.readline())

    def open(self) -> dict:
        return {k: np.load(self.udir / f"{self.index:06d}.{k}.npy", mmap_mode="r") for k in UNIT_ARRAYS}

    def doc(self, arrays: dict, j: int) -> dict:
        a, n = int(self.starts[j]), int(self.lengths[j])
        d = {k: np.array(arrays[k][a:a + n]) for k in FIELDS}
        m = int(self.und_rows[j])
        d["und_table"] = np.array(arrays["und_table"][self.und_starts[j]:self.und_starts[j] + m]) if m else None
        return d


def _pack(cfg: MultimodalDataConfig, plan: dict, udir: Path, markers: list[dict], tok: SegmentTokenizer,
          log: Callable[[str], None]) -> dict:
    n = len(markers)
    for p in udir.iterdir():  # outputs of units beyond the current list (shards were removed)
        if p.name[:6].isdigit() and int(p.name[:6]) >= n:
            p.unlink(missing_ok=True)
    units = [_UnitDocs(udir, i) for i in range(n)]
    text_docs = [(split, _document([Segment("text", "target", ids=ids)], tok))
                 for split, ids in _text_documents(cfg, tok.text)]
    templates = _templates(tok)
    skipped = [line for m in markers for line in m["skipped"]]
    out = Path(cfg.out_dir)
    tag = f"{socket.gethostname()}-{os.getpid()}"
    tmp = out.with_name(f"{out.name}.tmp-{tag}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    und_cnn, und_pix = tok.und_dims
    meta = {"format": MULTIMODAL_FORMAT, "seq_len": cfg.seq_len, "text_vocab_size": tok.text.vocab_size,
            "specials": special_ids(tok.text.vocab_size), "special_names": SPECIALS, "bits": tok.bits,
            "audio_levels": tok.levels, "audio_codebook": tok.audio.cfg.codebook_size, "eos_id": tok.text.eos_id,
            "und_cnn_dim": und_cnn, "und_pix_dim": und_pix, "und_patches": UND_PATCHES,
            "scales": tok.vision.cfg.scales, "text_tokenizer": cfg.text_tokenizer,
            "vision_tokenizer": cfg.vision_tokenizer, "audio_tokenizer": cfg.audio_tokenizer,
            "manifest": cfg.manifest or None,
            "webdataset": None if cfg.webdataset is None else {**plan["fingerprint"]["webdataset"],
                                                               "shards": [u["path"] for u in plan["units"]]},
            "buckets": tok.bucket_table(), "crop": tok.crop,
            "units": n, "skipped": skipped, "splits": {}, "files": {}}
    stats = {"skipped": len(skipped)}
    if cfg.manifest:
        stats["skipped_documents"] = len(skipped)
    for split in SPLITS:
        s = _pack_split(cfg.seq_len, split, units, text_docs, templates, tmp)
        meta["splits"][split] = s
        stats[f"{split}_rows"], stats[f"{split}_documents"] = s["rows"], s["documents"]
        stats[f"{split}_too_long"] = s["dropped_too_long"]
    maps = {}
    for grid in tok.latent_grids():
        maps.update(visual_history_maps(tok.vision, grid))
    np.savez(tmp / "vis_history.npz", **maps)
    for f in sorted(list(tmp.glob("*.npy")) + list(tmp.glob("*.npz")) + list(tmp.glob("*.jsonl"))):
        meta["files"][f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    _swap_in(tmp, out, tag)
    log(f"packed {n} units into {out}: train {stats['train_rows']} rows ({stats['train_documents']} documents), "
        f"val {stats['val_rows']} rows ({stats['val_documents']} documents), {len(skipped)} skipped")
    return stats


def _pack_split(seq_len: int, split: str, units: list[_UnitDocs], text_docs: list, templates: dict,
                tmp: Path) -> dict:
    """Shuffle the split's documents (fixed seed), assign them greedily to rows as `pack_documents` does, and
    write the rows PACK_ROWS at a time into memory-mapped output files."""
    want_val = split == "val"
    src, local, lengths, und_rows = [], [], [], []
    for u in units:
        idx = np.nonzero(u.val == want_val)[0]
        src.append(np.full(len(idx), u.index))
        local.append(idx)
        lengths.append(u.lengths[idx])
        und_rows.append(u.und_rows[idx])
    mine = [t for t, (s, _) in enumerate(text_docs) if s == split]
    src.append(np.full(len(mine), -1))
    local.append(np.array(mine, np.int64))
    lengths.append(np.array([len(text_docs[t][1]["token"]) for t in mine], np.int64))
    und_rows.append(np.zeros(len(mine), np.int64))
    src, local = np.concatenate(src).astype(np.int64), np.concatenate(local).astype(np.int64)
    lengths, und_rows = np.concatenate(lengths).astype(np.int64), np.concatenate(und_rows).astype(np.int64)
    order = np.random.default_rng(0).permutation(len(src))  # mix modalities (units list them grouped)
    row_of = np.full(len(order), -1, np.int64)  # per position in `order`
    rows, used = 0, 0
    for p, e in enumerate(order):
        length = int(lengths[e])
        if length > seq_len:
            continue
        if used + length > seq_len:
            rows, used = rows + 1, 0
        row_of[p] = rows
        used += length
    kept = np.nonzero(row_of >= 0)[0]
    total_rows = rows + 1 if len(kept) else 0
    total_und = int(und_rows[order[kept]].sum())
    outs = {k: np.lib.format.open_memmap(tmp / f"{split}.{k}.npy", mode="w+", dtype=dtype,
                                         shape=(total_rows, seq_len, *trail))
            for k, (dtype, trail) in templates.items() if k != "und_table"}
    outs["doc"] = np.lib.format.open_memmap(tmp / f"{split}.doc.npy", mode="w+", dtype=np.int32,
                                            shape=(total_rows, seq_len))
    dtype, trail = templates["und_table"]
    outs["und_table"] = np.lib.format.open_memmap(tmp / f"{split}.und_table.npy", mode="w+", dtype=dtype,
                                                  shape=(total_und, *trail))
    cache: OrderedDict[int, dict] = OrderedDict()

    def fetch(e: int) -> dict:
        u = int(src[e])
        if u < 0:
            return text_docs[int(local[e])][1]
        if u not in cache:
            if len(cache) >= OPEN_UNITS:
                cache.popitem(last=False)
            cache[u] = units[u].open()
        cache.move_to_end(u)
        return units[u].doc(cache[u], int(local[e]))

    kept_rows = row_of[kept]
    with open(tmp / f"{split}.samples.jsonl", "wb") as f:  # where each document landed, and what it is
        offset, last = 0, -1
        for p in kept:
            e, row = int(order[p]), int(row_of[p])
            offset = 0 if row != last else offset
            u = int(src[e])
            record = {"source": "text", "media": []} if u < 0 else units[u].sample(int(local[e]))
            f.write(_jsonl({"row": row, "offset": offset, "length": int(lengths[e]), **record}))
            offset, last = offset + int(lengths[e]), row
    m0 = 0
    for r0 in range(0, total_rows, PACK_ROWS):
        r1 = min(r0 + PACK_ROWS, total_rows)
        a, b = np.searchsorted(kept_rows, [r0, r1])
        packed, dropped = pack_documents([fetch(int(order[p])) for p in kept[a:b]], seq_len)
        if dropped or packed["token"].shape[0] != r1 - r0:  # the assignment above must match pack_documents
            raise AssertionError(f"packing rows {r0}..{r1}: got {packed['token'].shape[0]} rows, {dropped} dropped")
        packed["und_index"] = np.where(packed["und_index"] >= 0, packed["und_index"] + m0, -1).astype(np.int32)
        for k in FIELDS + ("doc",):
            outs[k][r0:r1] = packed[k]
        if packed["und_table"] is not None:
            outs["und_table"][m0:m0 + len(packed["und_table"])] = packed["und_table"]
            m0 += len(packed["und_table"])
    for arr in outs.values():
        arr.flush()
    outs.clear()  # unmap before the files are hashed and moved
    cache.clear()
    return {"documents": int(len(kept)), "dropped_too_long": int(len(order) - len(kept)), "rows": total_rows}


def _swap_in(tmp: Path, out: Path, tag: str) -> None:
    """Replace `out` by `tmp` (two packers finishing together both write the same bytes: the later one yields)."""
    old = out.with_name(f"{out.name}.old-{tag}")
    if out.exists():
        try:
            out.rename(old)
        except FileNotFoundError:
            pass
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


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
    fmt = str(meta.get("format"))
    if fmt.startswith("multimodal-") and fmt != MULTIMODAL_FORMAT:
        raise UserError(str(meta_path), f"shards in format {fmt}, this version reads {MULTIMODAL_FORMAT} (prepare "
                                        "them again with `ernie5 data prepare CONFIG`)")
    if fmt != MULTIMODAL_FORMAT:
        raise UserError(str(meta_path), "not a multimodal shard (text shards have no segments to inspect)")
    return meta


def open_multimodal_split(shard_dir: str, split: str) -> tuple[dict, dict]:
    """(meta, {field: memory-mapped array [rows, seq_len, ...]}) after checking sizes against meta.json."""
    root = Path(shard_dir)
    meta = read_multimodal_meta(shard_dir)
    arrays = {}
    for name, want in meta["files"].items():
        if not name.startswith(split + ".") or not name.endswith(".npy"):
            continue
        path = root / name
        if not path.is_file() or path.stat().st_size != want["bytes"]:
            raise UserError(str(path), "shard file missing or truncated")
        arrays[name[len(split) + 1:-4]] = np.load(path, mmap_mode="r")
    if not arrays:
        raise UserError(f"{shard_dir}: {split}", f"no such split (have {', '.join(meta['splits'])})")
    return meta, arrays
