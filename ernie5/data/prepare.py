"""`ernie5 data prepare` on a run config: tokenise every text source into train / val token shards.

Each text source of `data.resolved_sources` (the single-corpus form is one source, "corpus", prepared into
`data.dir` itself; multimodal sources are prepared directories and are skipped) is planned into work units
(`ernie5.data.readers`: byte ranges of uncompressed files, whole compressed files, Parquet row groups) and written
as described in `ernie5.data.shards`: `plan.json`, then per unit its token and document-start files and, last, its
done marker. Every file is written under a temporary name and renamed into place.

Parallelism: `workers` processes (spawned; each loads the tokenizer once) each take whole units, tokenise them and
write the unit's files themselves (streamed to disk batch by batch), returning only a few numbers, so memory is
about (a 16 MiB read block x workers) whatever the corpus, unit or compressed-file size. `partition=(I, N)` processes only the units with index % N == I: partitions may run on different
machines sharing the filesystem (a Slurm array, one process per node), with no coordinator.

Determinism: a unit's output depends only on the plan's fingerprint and the unit's index, so the prepared
directory is byte-identical for any `workers` and any partitioning (no timestamps, pids or host names are written).
Documents go to val when a seeded CRC-32 of their text is below val_fraction x 2^32 (`is_held_out`: the split of a
document never depends on files, globs or units; duplicates share a split), and the first document of unit 0
always does when val_fraction > 0 (a tiny corpus still has a val split).
BPE-dropout (`data.bpe_dropout` > 0): the unit's train documents are encoded `bpe_dropout_copies` times, copy c
after `sentencepiece.set_random_generator_seed` of a value derived from (seed, unit, c); val documents once,
without dropout. Caveat: sentencepiece's sampler (0.2.x) does not repeat across processes even with that seed,
so with BPE-dropout the sampled train tokens (not the document split, not val) differ between runs; everything
else above still holds (units, markers, restart, partitions).

Restart: `plan.json` holds the fingerprint (tokenizer sha256, source config, files with sizes and mtimes, seed,
val_fraction, dropout settings, unit_bytes). When it changes, the previous plan's unit directory is removed; a
unit whose done marker matches the plan (and whose files have the recorded sizes) is skipped. Running the same
command again after a kill therefore finishes the job, and a source with units lacking markers is refused by
`open_split`. Unusable records are skipped, counted per unit and reported at the end; a source that ends with no
document at all is a UserError.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import zlib
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional

import numpy as np
from tqdm import tqdm

from ernie5.data.readers import UNIT_BYTES, BadRecords, Unit, iter_documents, plan_units, resolve_files
from ernie5.data.shards import (PLAN, SPLITS, TEXT_FORMAT, TEXT_VERSION, check_file, fingerprint_sha256,
                                marker_name, read_marker, sha256_file, unit_file, units_dir)
from ernie5.errors import UserError
from ernie5.modality.text_tokenizer import TextTokenizer

if TYPE_CHECKING:  # the run config sits above data (it assembles every component's config)
    from ernie5.data.config import ResolvedSource
    from ernie5.runconfig import RunConfig

BATCH_DOCS = 512  # documents per sentencepiece call


# ------------------------------------------------------------------------------------------------------- file output

def _atomic_write(path: Path, write: Callable) -> None:
    """`write(binary file)` into a unique temporary file next to `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_bytes(obj) -> bytes:
    import json

    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


# ------------------------------------------------------------------------------------------------------- one unit

def _batches(blocks: Iterable[list[str]]) -> Iterator[list[str]]:
    """Slices of at most BATCH_DOCS documents of each block (a reader block holds at most ~16 MiB of text)."""
    for docs in blocks:
        for i in range(0, len(docs), BATCH_DOCS):
            yield docs[i:i + BATCH_DOCS]


def _dropout_seed(seed: int, unit: int, copy: int) -> int:
    return int(np.random.default_rng([seed, unit, copy, 0xB9E]).integers(1, 2 ** 31))


def _encode(sp, docs: list[str], eos: int, dtype, dropout: float) -> tuple[np.ndarray, np.ndarray]:
    """(flat tokens with EOS after each document, lengths incl. EOS) of a batch."""
    if dropout > 0:
        ids = sp.encode(docs, enable_sampling=True, alpha=dropout, nbest_size=-1, num_threads=1)
    else:
        ids = sp.encode(docs, num_threads=1)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    body = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return np.insert(body, np.cumsum(lengths), eos), lengths + 1  # EOS after each document


def prepare_unit(task: dict, sp) -> dict:
    """Tokenise one unit and write its files and done marker; returns the marker (small). The cyclic garbage
    collector is paused meanwhile: sentencepiece returns a Python list per document and the collections those
    allocations trigger cost ~10% of the unit's time, while the loop creates no reference cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _prepare_unit(task, sp)
    finally:
        if was_enabled:
            gc.enable()


def is_held_out(docs: list[str], seed: int, val_fraction: float) -> list[bool]:
    """Whether each document goes to val: a seeded CRC-32 of its text below val_fraction x 2^32. It depends on the
    text alone, so adding files, reordering globs or another --unit-mb never moves a document between the splits,
    and copies of one document always land in the same split."""
    if val_fraction <= 0:
        return [False] * len(docs)
    start, limit = zlib.crc32(f"ernie5-val-{seed}".encode()), int(val_fraction * 2 ** 32)
    return [zlib.crc32(d.encode("utf-8"), start) < limit for d in docs]


class _SplitWriter:
    """One split of a unit, streamed to disk as it is tokenised (memory: one batch, whatever the unit's size), then
    written as `.npy` files (tokens, int64 document starts) under temporary names and renamed into place."""

    def __init__(self, out: Path, index: int, split: str, dtype: np.dtype):
        self.out, self.index, self.split, self.dtype = out, index, split, dtype
        self.raw = {kind: tempfile.NamedTemporaryFile(dir=out, prefix=f".{index:06d}.{split}.{kind}.", suffix=".tmp")
                    for kind in ("tokens", "docs")}
        self.tokens = self.documents = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        starts = self.tokens + np.cumsum(lengths) - lengths
        self.raw["tokens"].write(tokens.astype(self.dtype, copy=False).tobytes())
        self.raw["docs"].write(starts.astype(np.int64).tobytes())
        self.tokens += int(tokens.size)
        self.documents += int(lengths.size)

    def finish(self) -> dict:
        """Write the `.npy` files; returns {file name: {bytes, sha256}}."""
        files = {}
        for kind, dtype, n in (("tokens", self.dtype, self.tokens), ("docs", np.dtype(np.int64), self.documents)):
            raw = self.raw[kind]
            raw.flush()
            raw.seek(0)
            name = unit_file(self.index, self.split, kind)

            def write(f, raw=raw, dtype=dtype, n=n):
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)})
                shutil.copyfileobj(raw, f, 1 << 22)

            _atomic_write(self.out / name, write)
            raw.close()
            files[name] = {"bytes": (self.out / name).stat().st_size, "sha256": sha256_file(self.out / name)}
        return files


def _prepare_unit(task: dict, sp) -> dict:
    import sentencepiece as spm

    index, unit = task["index"], Unit.from_json(task["unit"])
    out = Path(task["units_dir"])
    for stale in out.glob(f".{index:06d}.*.tmp"):  # left by a killed run of this unit (units are never shared)
        stale.unlink(missing_ok=True)
    seed, val_fraction, dropout = task["seed"], task["val_fraction"], task["dropout"]
    dtype, eos = np.dtype(task["dtype"]), task["eos_id"]
    copies = task["copies"] if dropout > 0 else 1
    writers = {s: _SplitWriter(out, index, s, dtype) for s in SPLITS}
    bad, documents = BadRecords(), 0
    for copy in range(copies):
        if dropout > 0:
            spm.set_random_generator_seed(_dropout_seed(seed, index, copy))
        first = index == 0 and val_fraction > 0  # a tiny corpus still gets a held-out document
        for batch in _batches(iter_documents(unit, task["field"], bad if copy == 0 else BadRecords())):
            is_val = is_held_out(batch, seed, val_fraction)
            if first:
                is_val[0], first = True, False
            if copy == 0:
                documents += len(batch)
                val = [d for d, v in zip(batch, is_val) if v]
                if val:
                    writers["val"].add(*_encode(sp, val, eos, dtype, 0.0))
            train = [d for d, v in zip(batch, is_val) if not v]
            if train:
                writers["train"].add(*_encode(sp, train, eos, dtype, dropout))
    files, splits = {}, {}
    for s, w in writers.items():
        files.update(w.finish())
        splits[s] = {"documents": w.documents, "tokens": w.tokens}
    marker = {"unit": index, "fingerprint_sha256": task["fingerprint_sha256"], "records": documents + bad.count,
              "documents_read": documents, "bad_records": bad.count, "bad_examples": bad.examples,
              "splits": splits, "files": files}
    _atomic_write(out / marker_name(index), lambda f: f.write(_json_bytes(marker)))
    return marker


_SP = None  # the worker process's tokenizer


def _init_worker(model_path: str) -> None:
    global _SP
    _SP = TextTokenizer(model_path).sp


def _work(task: dict) -> tuple:
    """Pool entry: UserErrors come back as values (their two-argument constructor does not survive pickling)."""
    try:
        return task["source"], prepare_unit(task, _SP), task["bytes"], None
    except UserError as e:
        return task["source"], None, task["bytes"], (e.where, e.reason)


# ------------------------------------------------------------------------------------------------------- planning

def _source_where(cfg: RunConfig, rs: ResolvedSource) -> str:
    if not cfg.data.sources:
        return "tokenizer.corpus"
    i = next(i for i, s in enumerate(cfg.data.sources) if s.name == rs.name)
    return f"data.sources[{i}] ({rs.name})"


def _plan_source(cfg: RunConfig, rs: ResolvedSource, tok: TextTokenizer, tok_sha: str, unit_bytes: int) -> dict:
    where = _source_where(cfg, rs)
    src, d = rs.config, cfg.data
    files = resolve_files(list(src.paths), where)
    units = plan_units(files, src.format, src.field, where, unit_bytes)
    stats = [os.stat(f) for f in files]
    fingerprint = {
        "tokenizer_sha256": tok_sha,
        "source": {"name": src.name, "paths": list(src.paths), "format": src.format, "field": src.field},
        "files": [{"path": f, "bytes": s.st_size, "mtime_ns": s.st_mtime_ns} for f, s in zip(files, stats)],
        "seed": cfg.run.seed, "val_fraction": d.val_fraction, "bpe_dropout": d.bpe_dropout,
        "bpe_dropout_copies": d.bpe_dropout_copies if d.bpe_dropout > 0 else 1, "unit_bytes": unit_bytes,
    }
    dtype = "uint16" if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"
    return {"format": TEXT_FORMAT, "version": TEXT_VERSION, "source": rs.name, "fingerprint": fingerprint,
            "fingerprint_sha256": fingerprint_sha256(fingerprint), "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "dtype": dtype, "units": [u.to_json() for u in units]}


def _install_plan(source_dir: Path, plan: dict) -> None:
    """Write plan.json (identical bytes from every partition) and remove the outputs of any other plan."""
    source_dir.mkdir(parents=True, exist_ok=True)
    path = source_dir / PLAN
    data = _json_bytes(plan)
    if not (path.is_file() and path.read_bytes() == data):
        _atomic_write(path, lambda f: f.write(data))
    mine = units_dir(source_dir, plan)
    for old in source_dir.glob("units-*"):
        if old.is_dir() and old != mine:
            shutil.rmtree(old, ignore_errors=True)
    _remove_single_file_format(source_dir)
    mine.mkdir(exist_ok=True)


def _remove_single_file_format(source_dir: Path) -> None:
    """Text shards of the format before work units (meta.json format 1) in the same directory."""
    import json

    meta = source_dir / "meta.json"
    try:
        if json.loads(meta.read_text(encoding="utf-8")).get("format") != 1:
            return
    except (OSError, ValueError, AttributeError):
        return
    for s in SPLITS:
        for kind in ("tokens", "docs"):
            (source_dir / f"{s}.{kind}.npy").unlink(missing_ok=True)
    meta.unlink(missing_ok=True)


def _unit_done(source_dir: Path, plan: dict, index: int) -> Optional[dict]:
    marker = read_marker(source_dir, plan, index)
    if marker is None:
        return None
    try:
        for name, want in marker["files"].items():
            check_file(units_dir(source_dir, plan) / name, want, verify=False)
    except (UserError, KeyError, TypeError):
        return None
    return marker


# ------------------------------------------------------------------------------------------------------- entry point

def parse_partition(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError("--partition", f"{text!r} must look like I/N (e.g. 0/4)") from None
    check_partition((i, n))
    return i, n


def check_partition(partition: tuple[int, int]) -> None:
    i, n = partition
    if n < 1 or not 0 <= i < n:
        raise UserError("--partition", f"{i}/{n}: need 0 <= I < N")


def prepare_text(cfg: RunConfig, progress: bool = True, workers: int = 1, partition: tuple[int, int] = (0, 1),
                 unit_bytes: int = UNIT_BYTES, log: Callable[[str], None] | None = None) -> dict:
    """Prepare every text source of the config (see the module docstring). Returns, per source name: dir,
    units (total, done now, skipped as already done, left to other partitions), and documents / tokens per split
    and bad records over this partition's units."""
    if workers < 1:
        raise UserError("--workers", f"{workers} must be >= 1")
    check_partition(partition)
    log = log or (lambda line: print(line, file=sys.stderr))
    part, nparts = partition
    sources = [s for s in cfg.data.resolved_sources(cfg.tokenizer.corpus) if not s.config.is_multimodal]
    if not sources:
        raise UserError("data.sources", "no text source to prepare (multimodal sources are prepared with their "
                                        "own `kind: multimodal` config)")
    tok = TextTokenizer(cfg.tokenizer.model_path)
    tok_sha = sha256_file(Path(tok.path))
    plans = {rs.name: _plan_source(cfg, rs, tok, tok_sha, unit_bytes) for rs in sources}  # all checks first
    jobs, markers, stats = [], {}, {}
    d = cfg.data
    for rs in sources:
        plan, sdir = plans[rs.name], Path(rs.dir)
        _install_plan(sdir, plan)
        mine = [i for i in range(len(plan["units"])) if i % nparts == part]
        markers[rs.name] = {}
        stats[rs.name] = {"dir": str(sdir), "units": len(plan["units"]), "units_done": 0, "units_skipped": 0,
                          "units_other_partitions": len(plan["units"]) - len(mine)}
        for i in mine:
            m = _unit_done(sdir, plan, i)
            if m is not None:
                markers[rs.name][i] = m
                stats[rs.name]["units_skipped"] += 1
                continue
            jobs.append({"source": rs.name, "index": i, "unit": plan["units"][i], "bytes": plan["units"][i]["bytes"],
                         "units_dir": str(units_dir(sdir, plan)), "field": rs.config.field, "seed": cfg.run.seed,
                         "val_fraction": d.val_fraction, "dropout": d.bpe_dropout, "copies": d.bpe_dropout_copies,
                         "dtype": plan["dtype"], "eos_id": plan["eos_id"],
                         "fingerprint_sha256": plan["fingerprint_sha256"]})
    for name, marker in _run(jobs, tok, workers, progress, log):
        markers[name][marker["unit"]] = marker
        stats[name]["units_done"] += 1
    for rs in sources:
        _summarise(stats[rs.name], list(markers[rs.name].values()))
        s = stats[rs.name]
        plan, sdir = plans[rs.name], Path(rs.dir)
        every = [markers[rs.name].get(i) or read_marker(sdir, plan, i) for i in range(len(plan["units"]))]
        if all(m is not None for m in every) and sum(m["documents_read"] for m in every) == 0:
            example = f" ({s['bad_records']} unusable records, e.g. {s['bad_examples'][0]})" \
                if s["bad_records"] else ""
            raise UserError(_source_where(cfg, rs), f"no documents in {len(every)} units{example}")
    for name, s in stats.items():
        if s["bad_records"]:
            log(f"source {name}: skipped {s['bad_records']} unusable records, e.g. " + "; ".join(s["bad_examples"]))
    return stats


def _summarise(s: dict, markers: list[dict]) -> None:
    s["documents"] = {k: sum(m["splits"][k]["documents"] for m in markers) for k in SPLITS}
    s["tokens"] = {k: sum(m["splits"][k]["tokens"] for m in markers) for k in SPLITS}
    s["documents_read"] = sum(m["documents_read"] for m in markers)
    s["bad_records"] = sum(m["bad_records"] for m in markers)
    s["bad_examples"] = [e for m in sorted(markers, key=lambda m: m["unit"]) for e in m["bad_examples"]][:3]


LOG_EVERY_S = 60.0  # without a progress bar (no terminal: a batch job's log), a progress line this often


def _run(jobs: list[dict], tok: TextTokenizer, workers: int, progress: bool,
         log: Callable[[str], None]) -> Iterator[tuple[str, dict]]:
    """Process the units (in-process for one worker, else a pool of spawned processes), with one progress bar over
    bytes, or a progress line every LOG_EVERY_S when stderr is not a terminal."""
    if not jobs:
        return
    total = sum(j["bytes"] for j in jobs)
    show_bar = progress and sys.stderr.isatty()
    bar = tqdm(total=total, desc="preparing", unit="B", unit_scale=True, disable=not show_bar)
    t0, docs, toks, done_bytes, units = time.perf_counter(), 0, 0, 0, 0
    last_log = t0

    def step(nbytes: int, marker: dict) -> None:
        nonlocal docs, toks, done_bytes, units, last_log
        docs += marker["documents_read"]
        toks += sum(v["tokens"] for v in marker["splits"].values())
        done_bytes, units = done_bytes + nbytes, units + 1
        now = time.perf_counter()
        rate = f"{docs / max(now - t0, 1e-9):,.0f} docs/s, {toks / max(now - t0, 1e-9):,.0f} tok/s"
        bar.update(nbytes)
        bar.set_postfix_str(rate, refresh=False)
        if progress and not show_bar and now - last_log >= LOG_EVERY_S:
            log(f"prepared {units}/{len(jobs)} units ({done_bytes / max(total, 1):.0%} of the input), {rate}")
            last_log = now

    try:
        if workers == 1 or len(jobs) == 1:
            for job in jobs:
                marker = prepare_unit(job, tok.sp)
                step(job["bytes"], marker)
                yield job["source"], marker
            return
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(tok.path,))
        try:
            for future in as_completed([pool.submit(_work, job) for job in jobs]):
                name, marker, nbytes, err = future.result()
                if err is not None:
                    raise UserError(*err)
                step(nbytes, marker)
                yield name, marker
        except BrokenProcessPool:
            raise UserError("data prepare", "a worker process died (out of memory? killed?); finished units are "
                                            "kept: run the same command again") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
