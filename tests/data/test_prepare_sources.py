"""`ernie5 data prepare` on text sources: formats and compression, work units, workers / partitions giving the
same bytes, restart after a kill, unusable records, and bad inputs exiting 2 with one line."""

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard

from ernie5.cli import main
from ernie5.data.prepare import prepare_text
from ernie5.data.shards import open_split, read_meta
from ernie5.errors import UserError
from ernie5.modality.text_tokenizer import TextTokenizer
from ernie5.runconfig import load_config
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def docs(text_assets):
    corpus, _, _ = text_assets
    return [line for line in corpus.read_text(encoding="utf-8").split("\n") if line.strip()]


def write_config(root: Path, tok: Path, sources: list, name: str = "cfg", **data) -> Path:
    cfg = {"tokenizer": {"model_path": str(tok)},
           "data": {"dir": str(root / "shards"), "val_fraction": 0.2, "sources": sources, **data}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def load(path: Path, *overrides):
    return load_config(str(path), list(overrides))


def reference(tok_path: Path, documents: list[str]) -> list[tuple]:
    """Each document encoded on its own, plus EOS: the independent expectation."""
    tok = TextTokenizer(str(tok_path))
    return sorted(tuple(tok.encode(d) + [tok.eos_id]) for d in documents)


def prepared_documents(source_dir: Path) -> list[tuple]:
    """Every document of train and val (sorted), read back through open_split's windows."""
    out = []
    for split in ("train", "val"):
        s = open_split(str(source_dir), split)
        tokens, doc = s.window(0, s.num_tokens)
        assert len(tokens) == s.num_tokens and (doc[1:] >= doc[:-1]).all()
        if s.num_docs:
            assert doc[-1] == s.num_docs - 1
        out += [tuple(int(t) for t in tokens[doc == i]) for i in range(s.num_docs)]
    return sorted(out)


def dir_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_jsonl(path: Path, lines: list[str]) -> bytes:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data, mtime=0))
    elif path.suffix == ".zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path.write_bytes(data)
    return data


def test_every_format_and_compression_gives_the_tokenizers_tokens(tmp_path, text_assets, docs):
    corpus, tok, _ = text_assets
    raw = tmp_path / "raw"
    raw.mkdir()
    text = "".join(d + "\n" for d in docs).encode("utf-8")
    (raw / "plain.txt").write_bytes(text.replace(b"\n", b"\r\n", 3))  # CRLF lines read as the same documents
    (raw / "packed.txt.gz").write_bytes(gzip.compress(text, mtime=0))
    records = [json.dumps({"id": i, "body": d}, ensure_ascii=i % 2 == 0) for i, d in enumerate(docs)]
    write_jsonl(raw / "a.jsonl", records[:20])
    write_jsonl(raw / "b.jsonl", records[20:])
    write_jsonl(raw / "c.jsonl.zst", records)
    write_jsonl(raw / "d.json.gz", records)
    pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), raw / "e.parquet", row_group_size=16)
    sources = [{"name": "plain", "paths": [str(raw / "plain.txt")]},
               {"name": "gz", "paths": [str(raw / "packed.txt.gz")]},
               {"name": "jsonl", "paths": [str(raw / "[ab].jsonl")], "field": "body"},
               {"name": "zst", "paths": [str(raw / "c.jsonl.zst")], "field": "body"},
               {"name": "jgz", "paths": [str(raw / "d.json.gz")], "field": "body", "format": "jsonl"},
               {"name": "parquet", "paths": [str(raw / "e.parquet")], "field": "body"}]
    cfg = load(write_config(tmp_path, tok, sources))
    stats = prepare_text(cfg, progress=False, unit_bytes=8192)
    want = reference(tok, docs)
    for name, s in stats.items():
        got = prepared_documents(Path(s["dir"]))
        assert got == want, name
        meta = read_meta(s["dir"])
        assert meta["vocab_size"] == 600 and meta["eos_id"] == 3 and meta["dtype"] == "uint16"
        assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(docs)
        assert meta["splits"]["val"]["documents"] > 0 and s["bad_records"] == 0
        assert sum(v["tokens"] for v in meta["splits"].values()) == sum(map(len, want))
    units = {n: s["units"] for n, s in stats.items()}
    assert units["plain"] == -(-len(text) // 8192) > 3  # byte ranges
    assert units["jsonl"] > 2 and units["gz"] == units["zst"] == units["jgz"] == 1  # a compressed file: one unit
    assert units["parquet"] == 3  # one per row group


def test_output_is_byte_identical_for_any_workers_and_partitions(tmp_path, text_assets, docs):
    _, tok, _ = text_assets
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    write_jsonl(raw / "b.jsonl.gz", [json.dumps({"text": d}) for d in docs[::2]])
    sources = [{"name": "a", "paths": [str(raw / "a.txt")], "weight": 2},
               {"name": "b", "paths": [str(raw / "b.jsonl.gz"), str(raw / "a.txt")]}]
    path = write_config(tmp_path, tok, sources)
    runs = {}
    for label, workers, parts in [("w1", 1, 1), ("w2", 2, 1), ("p3", 1, 3)]:
        cfg = load(path, f"data.dir={tmp_path / label}")
        for i in range(parts):
            stats = prepare_text(cfg, progress=False, workers=workers, partition=(i, parts), unit_bytes=6000)
            if parts > 1 and i == 0:
                assert stats["a"]["units_other_partitions"] > 0
                with pytest.raises(UserError, match=r"source a: \d+ of \d+ units not prepared .*--partition"):
                    open_split(str(tmp_path / label / "a"), "train")
        runs[label] = dir_bytes(tmp_path / label)
    assert stats["a"]["units"] >= 6 and stats["a"]["units_skipped"] == 0
    assert runs["w1"] == runs["w2"] == runs["p3"]
    assert prepared_documents(tmp_path / "p3" / "b") == reference(tok, docs[::2] + docs)


def test_bpe_dropout_stores_sampled_train_copies_and_plain_val(tmp_path, text_assets, docs):
    _, tok, _ = text_assets
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    path = write_config(tmp_path, tok, [{"name": "a", "paths": [str(tmp_path / "a.txt")]}])
    plain = prepare_text(load(path, f"data.dir={tmp_path / 'plain'}"), progress=False, unit_bytes=30000)["a"]
    cfg = load(path, f"data.dir={tmp_path / 'drop'}", "data.bpe_dropout=0.2", "data.bpe_dropout_copies=2")
    drop = prepare_text(cfg, progress=False, workers=2, unit_bytes=30000)["a"]
    assert drop["documents"] == {"train": 2 * plain["documents"]["train"], "val": plain["documents"]["val"]}
    assert drop["tokens"]["val"] == plain["tokens"]["val"] and drop["tokens"]["train"] > 2 * plain["tokens"]["train"]
    sp = TextTokenizer(str(tok))
    for split, want in [("train", 2 * plain["documents"]["train"]), ("val", plain["documents"]["val"])]:
        s = open_split(str(tmp_path / "drop" / "a"), split)
        tokens, doc = s.window(0, s.num_tokens)
        texts = [sp.decode([int(t) for t in tokens[doc == i][:-1]]) for i in range(s.num_docs)]
        assert len(texts) == want and set(texts) <= {sp.decode(sp.encode(d)) for d in docs}


def test_restart_after_a_kill_skips_finished_units_and_matches(tmp_path, text_assets, docs):
    _, tok, _ = text_assets
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    path = write_config(tmp_path, tok, [{"name": "web", "paths": [str(raw / "*.txt")]}])
    full = load(path, f"data.dir={tmp_path / 'full'}")
    prepare_text(full, progress=False, unit_bytes=20000)
    cfg = load(path, f"data.dir={tmp_path / 'killed'}")
    n = prepare_text(cfg, progress=False, unit_bytes=20000)["web"]["units"]
    units = next((tmp_path / "killed" / "web").glob("units-*"))
    (units / "000002.done.json").unlink()  # killed while writing unit 2: its marker never came
    (units / "000002.val.tokens.npy").unlink()
    (units / "000002.train.tokens.npy").write_bytes(b"half")
    (units / ".000002.train.docs.npy.x.tmp").write_bytes(b"temp")
    with pytest.raises(UserError, match=rf"source web: 1 of {n} units not prepared"):
        open_split(str(tmp_path / "killed" / "web"), "train")
    with pytest.raises(UserError, match="units not prepared"):
        read_meta(str(tmp_path / "killed" / "web"))
    again = prepare_text(cfg, progress=False, unit_bytes=20000)["web"]
    assert (again["units_done"], again["units_skipped"]) == (1, n - 1)
    assert dir_bytes(tmp_path / "killed") == dir_bytes(tmp_path / "full")
    # a damaged unit file is named by the reader
    f = units / "000001.train.tokens.npy"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(UserError, match="000001.train.tokens.npy: truncated or resized shard"):
        open_split(str(tmp_path / "killed" / "web"), "train", verify=False)
    # another fingerprint (val_fraction) replaces the old outputs
    changed = prepare_text(load(path, f"data.dir={tmp_path / 'killed'}", "data.val_fraction=0.5"),
                           progress=False, unit_bytes=20000)["web"]
    assert changed["units_done"] == n and len(list((tmp_path / "killed" / "web").glob("units-*"))) == 1


def test_a_really_killed_preparation_is_refused_then_finished_by_the_same_command(tmp_path, text_assets, docs):
    """SIGKILL `ernie5 data prepare --workers 2` once a few units are done: training refuses the source, and
    running the same command again prepares only the rest, to the bytes of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    _, tok, _ = text_assets
    raw = tmp_path / "raw"
    raw.mkdir()
    big = ("\n".join(docs) + "\n") * 40  # ~1.6 MB: ~100 units of 16 KiB
    (raw / "a.txt").write_text(big, encoding="utf-8")
    path = write_config(tmp_path, tok, [{"name": "web", "paths": [str(raw / "a.txt")]}])
    cmd = [sys.executable, "-m", "ernie5", "data", "prepare", str(path), "--workers", "2", "--unit-mb", "0.015625"]
    full = run_cli("data", "prepare", str(path), "--workers", "2", "--unit-mb", "0.015625",
                   f"data.dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr
    total = len(list((tmp_path / "full" / "web").glob("units-*/*.done.json")))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    src = tmp_path / "shards" / "web"
    deadline = time.time() + 120
    while len(list(src.glob("units-*/*.done.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its workers, mid-way
    proc.wait()
    done = len(list(src.glob("units-*/*.done.json")))
    assert 3 <= done < total, (done, total)
    r = run_cli("train", str(path), f"run.output_dir={tmp_path / 'run'}", "model.num_layers=1")
    assert r.returncode == 2 and "units not prepared" in r.stderr and "Traceback" not in r.stderr, r.stderr
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"({total - done} prepared, {done} already done" in again.stdout, again.stdout
    assert dir_bytes(tmp_path / "shards") == dir_bytes(tmp_path / "full")


def test_unusable_records_are_skipped_and_counted(tmp_path, text_assets, docs, capsys):
    _, tok, _ = text_assets
    raw = tmp_path / "raw"
    raw.mkdir()
    good = [json.dumps({"text": d}) for d in docs[:10]]
    bad = ['{"text": "cut off', json.dumps({"body": "x"}), json.dumps({"text": 7}), json.dumps({"text": "a\u0000b"}),
           "[1, 2]"]
    lines = good[:4] + bad + good[4:]
    data = write_jsonl(raw / "mixed.jsonl", lines)
    data = data.replace(b'"text": 7}', b'"text": 7}\n{"text": "caf\xe9"}')  # and one line not UTF-8
    (raw / "mixed.jsonl").write_bytes(data)
    (raw / "mixed.jsonl.gz").write_bytes(gzip.compress(data, mtime=0))
    path = write_config(tmp_path, tok, [{"name": "plain", "paths": [str(raw / "mixed.jsonl")]},
                                        {"name": "gz", "paths": [str(raw / "mixed.jsonl.gz")]}])
    stats = prepare_text(load(path), progress=False, unit_bytes=256)
    err = capsys.readouterr().err
    want = reference(tok, docs[:10])
    for name, place in [("plain", "byte"), ("gz", "line")]:
        s = stats[name]
        assert s["bad_records"] == 6 and s["documents_read"] == 10, s
        assert prepared_documents(Path(s["dir"])) == want
        assert f"source {name}: skipped 6 unusable records" in err
        assert f"mixed.jsonl{'.gz' if name == 'gz' else ''}:{place} " in s["bad_examples"][0]
    assert "gz: skipped 6 unusable records, e.g. " + str(raw / "mixed.jsonl.gz") + ":line 5: bad JSON" in err


@pytest.fixture(scope="module")
def bad_world(tmp_path_factory, text_assets, docs):
    root = tmp_path_factory.mktemp("bad_sources")
    (root / "ok.txt").write_text("\n".join(docs[:5]) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"body": docs[:5], "id": list(range(5))}), root / "t.parquet")
    write_jsonl(root / "nofield.jsonl", [json.dumps({"body": d, "id": 1}) for d in docs[:5]])
    write_jsonl(root / "ints.jsonl", [json.dumps({"text": i}) for i in range(5)])
    rng = np.random.default_rng(0)
    (root / "garbage.txt").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (root / "latin.jsonl").write_bytes("".join(f'{{"text": "caf\xe9 {i}"}}\n' for i in range(9)).encode("latin-1"))
    return root


def source_args(root, tok, *sources, ok_weight=1):
    name = "cfg_" + "_".join(s["name"] for s in sources)
    cfg = write_config(root, tok, [{"name": "ok", "paths": [str(root / "ok.txt")], "weight": ok_weight}, *sources],
                       name=name)
    return ["data", "prepare", str(cfg), f"data.dir={root / 'out'}"]


BAD = [
    ("parquet without the column", [{"name": "pq", "paths": ["{root}/t.parquet"]}],
     "data.sources[1] (pq): {root}/t.parquet: no column 'text' (`field:`; columns: body, id)"),
    ("jsonl without the field", [{"name": "web", "paths": ["{root}/nofield.jsonl"]}],
     "data.sources[1] (web): {root}/nofield.jsonl: no record has the field 'text' (`field:`; its records have "
     "body, id)"),
    ("binary garbage", [{"name": "bin", "paths": ["{root}/garbage.txt"]}],
     "data.sources[1] (bin): {root}/garbage.txt: looks binary, not text (NUL bytes"),
    ("not utf-8", [{"name": "lat", "paths": ["{root}/latin.jsonl"]}],
     "{root}/latin.jsonl: not UTF-8 text: looks binary, not jsonl (9 of 9 lines"),
    ("empty glob", [{"name": "web", "paths": ["{root}/ok.txt", "{root}/x/*.jsonl"]}],
     "data.sources[1] (web): no file matches '{root}/x/*.jsonl'"),
    ("missing file", [{"name": "web", "paths": ["{root}/nope.jsonl"]}],
     "data.sources[1] (web): {root}/nope.jsonl: file not found"),
    ("no documents", [{"name": "ints", "paths": ["{root}/ints.jsonl"]}],
     "data.sources[1] (ints): no documents in 1 units (5 unusable records, e.g. {root}/ints.jsonl:byte 0: "
     "'text' is a int, not a string)"),
    ("negative weight", [{"name": "web", "paths": ["{root}/ok.txt"], "weight": -1}],
     "data.sources[1].weight: -1.0 must be >= 0"),
    ("every weight 0", [{"name": "web", "paths": ["{root}/ok.txt"], "weight": 0}],
     "data.sources: every weight is 0"),
]


@pytest.mark.parametrize("name, sources, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_sources_exit_2_with_one_line(bad_world, text_assets, capfd, name, sources, expected):
    root, tok = bad_world, text_assets[1]
    sources = [json.loads(json.dumps(s).replace("{root}", str(root))) for s in sources]
    argv = source_args(root, tok, *sources, ok_weight=0 if name == "every weight 0" else 1)
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected.replace("{root}", str(root)) in err[0], err
    assert not (root / "out" / sources[-1]["name"] / "units-").exists()


def test_cli_subprocess_bad_input_and_partition_syntax(bad_world, text_assets):
    root, tok = bad_world, text_assets[1]
    for argv, expected in [
        (source_args(root, tok, {"name": "bin", "paths": [str(root / "garbage.txt")]}), "looks binary, not text"),
        (source_args(root, tok) + ["--partition", "3/3"], "error: --partition: 3/3: need 0 <= I < N"),
        (source_args(root, tok) + ["--partition", "two"], "error: --partition: 'two' must look like I/N"),
    ]:
        p = run_cli(*argv, timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and expected in p.stderr, p.stderr
    p = run_cli(*source_args(root, tok), f"data.dir={root / 'cli'}", "--workers", "2", "--partition", "0/1",
                timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"source ok -> {root / 'cli' / 'ok'}: 1 units (1 prepared, 0 already done); train ")


def test_block_fast_paths_give_what_line_by_line_reading_gives(docs):
    """Arrow's JSON reader and the one-decode text path (taken for clean blocks) against `decode_line` per line."""
    from ernie5.data.readers import _arrow_json_documents, _text_documents, decode_line

    def by_line(block, fmt, field="text"):
        out = [decode_line(raw, fmt, field) for raw in block.split(b"\n") if raw]
        assert all(why is None for _, why in out)
        return [d for d, _ in out if d is not None]

    records = [{"text": d, "id": i, "meta": {"x": [1, 2]}} for i, d in enumerate(docs)] + [{"text": "   "},
                                                                                            {"text": "tab\there"}]
    block = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    fast = _arrow_json_documents(block, "text")
    assert fast is not None and fast == by_line(block, "jsonl") and len(fast) == len(docs) + 1
    ascii_block = "".join(json.dumps(r) + "\n" for r in records).encode()  # \uXXXX escapes for the Chinese
    assert _arrow_json_documents(ascii_block, "text") == fast
    assert _arrow_json_documents(block + b"\n", "text") is None  # a blank line: read line by line
    assert _arrow_json_documents(block + b'{"id": 3}\n', "text") is None  # a missing field: named line by line
    text = ("\r\n".join(docs[:10]) + "\n  \n\u3000\n" + "\n".join(docs[10:])).encode()
    assert _text_documents(text) == by_line(text, "text") and len(_text_documents(text)) == len(docs)


def test_bad_bytes_in_clean_looking_blocks_are_skipped_not_crashed(tmp_path, text_assets, docs):
    """Bad UTF-8, raw surrogate bytes and two objects on one line beside a blank line, inside otherwise
    clean JSONL and Parquet blocks: each bad record is skipped and counted, the good documents all arrive."""
    _, tok, _ = text_assets
    raw = tmp_path / "raw"
    raw.mkdir()
    good = docs[:12]
    lines = [json.dumps({"text": d}, ensure_ascii=False).encode() for d in good]
    lines[3:3] = [b'{"text": "caf\xe9 au lait"}', b'{"text": "x\xed\xa0\x80y"}', b'{"text": "a"}{"text": "b"}', b""]
    (raw / "web.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    table = pa.table({"text": pa.array([d.encode() for d in good] + [b"caf\xe9"], pa.binary()).view(pa.string())})
    pq.write_table(table, raw / "books.parquet")
    path = write_config(tmp_path, tok, [{"name": "web", "paths": [str(raw / "web.jsonl")]},
                                        {"name": "books", "paths": [str(raw / "books.parquet")]}],
                        val_fraction=0.0)
    stats = prepare_text(load(path), progress=False, log=lambda line: None)
    assert stats["web"]["bad_records"] == 3 and stats["books"]["bad_records"] == 1
    want = reference(tok, good)
    for name in ("web", "books"):
        assert prepared_documents(tmp_path / "shards" / name) == want


def test_a_json_array_file_is_refused_and_the_split_follows_the_text(tmp_path, text_assets, docs):
    _, tok, _ = text_assets
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "array.json").write_text(json.dumps([{"text": d} for d in docs[:5]]))
    r = run_cli("data", "prepare", str(write_config(tmp_path, tok, [{"name": "a", "paths": [str(raw / "array.json")]}])))
    assert r.returncode == 2 and "a JSON array, not JSON Lines" in r.stderr and "Traceback" not in r.stderr
    # a document's split depends on its text only: adding a file and shrinking units moves nothing
    (raw / "one.txt").write_text("\n".join(docs[:30]) + "\n", encoding="utf-8")
    (raw / "two.txt").write_text("\n".join(docs[30:]) + "\n", encoding="utf-8")

    def val_docs(paths, unit_bytes, out):
        cfg = load(write_config(tmp_path, tok, [{"name": "w", "paths": paths}], name=out, dir=str(tmp_path / out),
                                val_fraction=0.3))
        prepare_text(cfg, progress=False, unit_bytes=unit_bytes)
        s = open_split(str(tmp_path / out / "w"), "val")
        tokens, doc = s.window(0, s.num_tokens)
        return {tuple(tokens[doc == i].tolist()) for i in range(s.num_docs)}

    alone = val_docs([str(raw / "two.txt")], 1 << 20, "alone")
    both = val_docs([str(raw / "one.txt"), str(raw / "two.txt")], 4096, "both")
    forced = reference(tok, [docs[30]])[0]  # the first document of unit 0 is always held out
    assert len(alone) > 2 and alone - {forced} <= both
