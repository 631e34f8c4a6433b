"""Reading text sources: which files, in which format, cut into which work units, and their records.

A source's `paths` (files or globs; each glob expanded and sorted, in `paths` order, duplicates dropped) are
checked when the preparation is planned: a missing file or an empty glob, a file that looks binary (NUL bytes in
its first 64 KiB, decompressed, or most of its lines failing to decode), a Parquet file without the configured
column, or a JSONL file none of whose first records has the configured field is a UserError naming the source
and the file. Formats: `text` (one document per non-blank line), `jsonl` (one JSON object per line, the document
in `field`), `parquet` (the document in column `field`); a `.gz` / `.zst` suffix is decompressed while streaming.

Work units (`plan_units`), deterministic in the files and `unit_bytes` alone:
  * an uncompressed text / JSONL file is cut into byte ranges [k * unit_bytes, (k+1) * unit_bytes); a line
    belongs to the range its first byte lies in (Hadoop-style), so a unit seeks to its start, skips the partial
    line it lands in and reads past its end only to finish its last line;
  * a compressed file is one unit (read as a stream from its start);
  * a Parquet file gives one unit per row group.

A record that cannot be used (bad UTF-8, bad JSON, missing field, a non-string value, NUL bytes) is skipped and
counted (`BadRecords`) with its place: `file:byte N` (uncompressed), `file:line N` (compressed) or `file:row N`
(Parquet), never an exception. A compressed stream that is corrupt or truncated part-way is a UserError.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from ernie5.errors import UserError

UNIT_BYTES = 64 << 20  # work-unit size for uncompressed text / JSONL files
SNIFF_BYTES = 64 << 10  # how much of each file (decompressed) is looked at when planning
FORMATS = ("text", "jsonl", "parquet")
_EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
               ".parquet": "parquet"}
_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
EXAMPLES_KEPT = 3  # bad-record reasons kept per unit


def file_format(path: str, declared: Optional[str], where: str) -> tuple[str, Optional[str]]:
    """(format, compression or None) of one file: the declared format, else its extension's."""
    p = Path(path)
    compression = _COMPRESSIONS.get(p.suffix.lower())
    stem = p.with_suffix("") if compression else p
    fmt = declared or _EXTENSIONS.get(stem.suffix.lower())
    if fmt is None:
        raise UserError(where, f"{path}: cannot tell the format from the extension (known: "
                               f"{', '.join(_EXTENSIONS)}, optionally + .gz / .zst); set `format:`")
    if fmt not in FORMATS:
        raise UserError(where, f"{path}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "parquet" and compression:
        raise UserError(where, f"{path}: a {compression}-compressed Parquet file cannot be read by row group "
                               "(Parquet compresses its columns itself; store it uncompressed)")
    return fmt, compression


def resolve_files(paths: list[str], where: str) -> list[str]:
    """The files of a source: each path as is, each glob expanded and sorted; missing ones are a UserError."""
    if not paths:
        raise UserError(where, "no files given")
    out: list[str] = []
    for pattern in paths:
        if glob.has_magic(pattern):
            found = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
            if not found:
                raise UserError(where, f"no file matches {pattern!r}")
        else:
            if not os.path.isfile(pattern):
                raise UserError(where, f"{pattern}: file not found")
            found = [pattern]
        out.extend(f for f in found if f not in out)
    return out


def open_stream(path: str, compression: Optional[str]):
    """A binary line-iterable reader of the decompressed bytes."""
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        import zstandard

        fh = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


def _stream_errors():
    import zlib

    import zstandard

    return (OSError, EOFError, zlib.error, zstandard.ZstdError)


# ---------------------------------------------------------------------------------------------------------- records

class BadRecords:
    """Count of skipped records and the first few reasons (`file:place: reason`)."""

    def __init__(self):
        self.count = 0
        self.examples: list[str] = []

    def add(self, place: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES_KEPT:
            self.examples.append(f"{place}: {reason}")


def decode_line(raw: bytes, fmt: str, field: str) -> tuple[Optional[str], Optional[str]]:
    """(document or None, reason it is bad or None). A blank line is (None, None): nothing, not an error."""
    if fmt != "text":  # fast path for a good JSON line: one parse, no copies (JSON parsing is the reader's cost)
        try:
            obj = json.loads(raw.decode("utf-8"))  # strict: no surrogates, no UTF-16 (json.loads(bytes) takes both)
        except (ValueError, RecursionError):
            obj = None
        if type(obj) is dict:
            value = obj.get(field)
            # escapes of NUL or of a surrogate are the only ways JSON yields text sentencepiece cannot take
            if type(value) is str and b"\\u0000" not in raw and b"\\ud" not in raw and b"\\uD" not in raw:
                return (value, None) if value and not value.isspace() else (None, None)
    raw = raw.rstrip(b"\n")
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if not raw.strip():
        return None, None
    if b"\x00" in raw:
        return None, "NUL byte in the line"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 ({e.reason} at byte {e.start} of the line)"
    if fmt == "text":
        return (line, None) if line.strip() else (None, None)
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:
        return None, f"bad JSON ({str(e).splitlines()[0][:80]})"
    if not isinstance(obj, dict):
        return None, f"a JSON {type(obj).__name__}, not an object"
    if field not in obj:
        return None, f"no field {field!r} (keys: {', '.join(list(map(str, obj))[:8]) or 'none'})"
    return check_value(obj[field], field)


def check_value(value, field: str) -> tuple[Optional[str], Optional[str]]:
    if value is None:
        return None, f"{field!r} is null"
    if not isinstance(value, str):
        return None, f"{field!r} is a {type(value).__name__}, not a string"
    if "\x00" in value:
        return None, f"NUL character in {field!r}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None, f"unpaired surrogate in {field!r}"
    return (value, None) if value.strip() else (None, None)


@dataclass(frozen=True)
class Unit:
    """One work unit: a byte range of a file (`row_group` -1), a whole compressed file (start 0, end -1) or a
    Parquet row group (`row_group` >= 0, `start` = the file's row index of its first row)."""

    file: str
    format: str
    compression: Optional[str]
    start: int
    end: int
    row_group: int = -1
    bytes: int = 0  # input size (progress)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "Unit":
        return Unit(**d)


BLOCK_BYTES = 16 << 20  # text / JSONL is parsed in blocks of whole lines of about this size
_BLANK_LINE = re.compile(rb"(?:^|\n)[ \t\r\f\v]*(?:\n|$)")


def iter_documents(unit: Unit, field: str, bad: BadRecords) -> Iterator[list[str]]:
    """The documents of one unit, in file order, a list per block (a block of lines or a Parquet record batch:
    no per-document Python work on the clean path); unusable records go to `bad`."""
    if unit.format == "parquet":
        yield from _parquet_documents(unit, field, bad)
        return
    if unit.compression is None:
        try:
            for block, offset in _range_blocks(unit):
                yield _block_documents(block, unit, field, bad, lambda i, n: f"{unit.file}:byte {offset + n}")
        except OSError as e:
            raise UserError(unit.file, f"unreadable ({e.strerror or e})") from None
        return
    try:
        for block, line in _stream_blocks(unit):
            yield _block_documents(block, unit, field, bad, lambda i, n: f"{unit.file}:line {line + i}")
    except _stream_errors() as e:
        raise UserError(unit.file, f"corrupt or truncated {unit.compression} stream ({e})") from None


def _range_blocks(unit: Unit) -> Iterator[tuple[bytes, int]]:
    """(block of whole lines, file offset of its first byte) covering the lines that start in [start, end)."""
    with open(unit.file, "rb") as f:
        pos = unit.start
        if pos > 0:  # the line we land in belongs to the previous unit (unless one starts exactly here)
            f.seek(pos - 1)
            pos = pos - 1 + len(f.readline())
        while pos < unit.end:
            data = f.read(min(BLOCK_BYTES, unit.end - pos))
            if not data:
                return
            if pos + len(data) >= unit.end:  # the unit's last line may run past its end: finish it
                if not data.endswith(b"\n"):
                    data += f.readline()
            else:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a block
                    data += f.readline()
                else:
                    f.seek(pos + cut)
                    data = data[:cut]
            yield data, pos
            pos += len(data)


def _stream_blocks(unit: Unit) -> Iterator[tuple[bytes, int]]:
    """(block of whole lines, line number of its first line) of a whole decompressed file."""
    with open_stream(unit.file, unit.compression) as f:
        rest, line = b"", 1
        while chunk := f.read(BLOCK_BYTES):
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            block, rest = data[:cut], data[cut:]
            if block:
                yield block, line
                line += block.count(b"\n")
        if rest:
            yield rest, line


def _block_documents(block: bytes, unit: Unit, field: str, bad: BadRecords, place) -> list[str]:
    """The documents of a block of whole lines. Fast paths parse a clean block at once (Arrow's JSON reader for
    JSONL, one UTF-8 decode for text); a block with anything unusual goes line by line through `decode_line`,
    which gives the same documents and names each bad record (`place(line index, byte offset in the block)`)."""
    fast = _arrow_json_documents(block, field) if unit.format == "jsonl" else _text_documents(block)
    if fast is not None:
        return fast
    out, n = [], 0
    for i, raw in enumerate(block.split(b"\n")):
        if raw:
            doc, why = decode_line(raw, unit.format, field)
            if why is not None:
                bad.add(place(i, n), why)
            elif doc is not None:
                out.append(doc)
        n += len(raw) + 1
    return out


def _text_documents(block: bytes) -> Optional[list[str]]:
    if b"\x00" in block:
        return None
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        return None
    out = []
    for line in text.split("\n"):
        if line.endswith("\r"):
            line = line[:-1]
        if line and not line.isspace():
            out.append(line)
    return out


def _arrow_json_documents(block: bytes, field: str) -> Optional[list[str]]:
    """Every line's `field` through pyarrow's JSON reader, or None when any line is not a plain object with a
    string `field` (then the block is read line by line, which names the bad records)."""
    import pyarrow as pa
    import pyarrow.json as pj

    if b"\\u0000" in block or b"\\ud" in block or b"\\uD" in block:  # NUL or surrogate escapes: per line
        return None
    body = block[:-1] if block.endswith(b"\n") else block
    if _BLANK_LINE.search(body):  # Arrow skips blank lines, which would hide a line holding two objects
        return None
    try:
        block.decode("utf-8")  # Arrow does not validate UTF-8 (nor would its strings survive to_pylist)
    except UnicodeDecodeError:
        return None
    try:
        table = pj.read_json(io.BytesIO(block),
                             read_options=pj.ReadOptions(use_threads=False, block_size=len(block) + 1),
                             parse_options=pj.ParseOptions(explicit_schema=pa.schema([(field, pa.string())]),
                                                           unexpected_field_behavior="ignore"))
    except (pa.ArrowException, ValueError):
        return None
    column = table.column(field)
    if column.null_count or table.num_rows != block.count(b"\n") + (not block.endswith(b"\n")):
        return None  # a missing field, a null, or a blank line somewhere
    return [d for d in column.to_pylist() if d and not d.isspace()]


def _parquet_documents(unit: Unit, field: str, bad: BadRecords) -> Iterator[list[str]]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    row = unit.start
    try:
        pf = pq.ParquetFile(unit.file)
        for batch in pf.iter_batches(batch_size=4096, row_groups=[unit.row_group], columns=[field]):
            column = batch.column(0)
            values = _parquet_values(column)
            clean = (values is not None and column.null_count == 0 and _is_arrow_string(column.type) and
                     not pc.any(pc.match_substring(column, "\x00")).as_py())
            if clean:  # valid UTF-8 strings: only blank documents to drop
                yield [v for v in values if v and not v.isspace()]
            else:
                docs = []
                for i in range(len(column)):
                    try:
                        doc, why = check_value(column[i].as_py(), field)
                    except UnicodeDecodeError as e:
                        doc, why = None, f"not UTF-8 ({e.reason} at byte {e.start})"
                    if why is not None:
                        bad.add(f"{unit.file}:row {row + i}", why)
                    elif doc is not None:
                        docs.append(doc)
                yield docs
            row += len(column)
    except (OSError, pa.ArrowException) as e:
        raise UserError(unit.file, f"unreadable Parquet row group {unit.row_group} ({str(e).splitlines()[0]})") \
            from None


def _parquet_values(column) -> Optional[list]:
    """The column as Python values, or None when some string is not valid UTF-8 (then read value by value)."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        return None


def _is_arrow_string(tp) -> bool:
    import pyarrow as pa

    return pa.types.is_string(tp) or pa.types.is_large_string(tp)


# ---------------------------------------------------------------------------------------------------------- planning

def sniff(path: str, fmt: str, compression: Optional[str], field: str, where: str) -> None:
    """Refuse a file that is not what its format says, from its first SNIFF_BYTES (decompressed)."""
    try:
        with open_stream(path, compression) as f:
            head = f.read(SNIFF_BYTES + 1)
    except _stream_errors() as e:
        raise UserError(where, f"{path}: not a readable {compression} file ({e})") from None
    eof = len(head) <= SNIFF_BYTES
    head = head[:SNIFF_BYTES]
    if fmt == "jsonl" and head.lstrip()[:1] == b"[":
        raise UserError(where, f"{path}: a JSON array, not JSON Lines (one object per line); convert it, e.g. "
                               "`jq -c '.[]' in.json > out.jsonl`")
    if b"\x00" in head:
        raise UserError(where, f"{path}: looks binary, not {fmt} (NUL bytes in its first "
                               f"{SNIFF_BYTES >> 10} KiB)")
    lines = head.split(b"\n")
    if not eof and len(lines) > 1:
        lines = lines[:-1]  # the last line is cut off by the window
    checked = failed = 0
    utf8_failed = 0
    fields_missing = objects = 0
    keys: list[str] = []
    for raw in lines:
        if not raw.strip() or (not eof and len(lines) == 1):
            continue
        checked += 1
        doc, why = decode_line(raw, fmt, field)
        if why is None:
            if fmt == "jsonl":
                objects += 1
            continue
        if why.startswith("not UTF-8") or why.startswith("bad JSON") or why.startswith("a JSON"):
            failed += 1
            utf8_failed += why.startswith("not UTF-8")
        elif why.startswith("no field"):
            objects += 1
            fields_missing += 1
            obj = json.loads(raw)
            keys.extend(k for k in map(str, obj) if k not in keys)
    if checked and 2 * failed > checked:
        what = "not UTF-8 text: " if utf8_failed * 2 > checked else ""
        raise UserError(where, f"{path}: {what}looks binary, not {fmt} ({failed} of {checked} lines in its first "
                               f"{SNIFF_BYTES >> 10} KiB do not decode)")
    if fmt == "jsonl" and objects and fields_missing == objects:
        raise UserError(where, f"{path}: no record has the field {field!r} (`field:`; its records have "
                               f"{', '.join(keys[:12]) or 'no keys'})")


def _parquet_units(path: str, field: str, where: str) -> list[Unit]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException, ValueError) as e:
        raise UserError(where, f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise UserError(where, f"{path}: no column {field!r} (`field:`; columns: {', '.join(schema.names)})")
    typ = schema.field(field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)
            or getattr(pa.types, "is_string_view", lambda t: False)(typ)):
        raise UserError(where, f"{path}: column {field!r} holds {typ}, not strings")
    units, row = [], 0
    md = pf.metadata
    for rg in range(md.num_row_groups):
        g = md.row_group(rg)
        units.append(Unit(path, "parquet", None, row, row + g.num_rows, rg, int(g.total_byte_size)))
        row += g.num_rows
    return units


def plan_units(files: list[str], declared: Optional[str], field: str, where: str,
               unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """The work units of a source's files, in file order (see the module docstring)."""
    if unit_bytes < 1:
        raise ValueError("unit_bytes must be >= 1")
    units: list[Unit] = []
    for path in files:
        fmt, compression = file_format(path, declared, where)
        if fmt == "parquet":
            units.extend(_parquet_units(path, field, where))
            continue
        sniff(path, fmt, compression, field, where)
        size = os.path.getsize(path)
        if compression:
            units.append(Unit(path, fmt, compression, 0, -1, -1, size))
            continue
        for start in range(0, size, unit_bytes):
            end = min(start + unit_bytes, size)
            units.append(Unit(path, fmt, None, start, end, -1, end - start))
    return units
