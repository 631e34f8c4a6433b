"""WebDataset tar shards as multimodal input: tasks per sample, held-out split by key, corrupt samples skipped and
named, per-unit outputs (workers, partitions, resume) packed into byte-identical shards."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ernie5.errors import UserError
from tests.conftest import run_cli

VIDEO_FRAMES = 4


@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory, text_assets):
    """Untrained tiny vision (16x16 grayscale, scales 1-2-4-8) and audio (16 kHz, 2 levels) tokenizer assets: their
    codes are arbitrary but deterministic, which is all preparation needs. Plus the session's text tokenizer."""
    import paddle

    from ernie5.modality.audio import AudioTokenizer
    from ernie5.modality.media_io import load_recipe, save_asset
    from ernie5.modality.vision import VisionTokenizer

    root = tmp_path_factory.mktemp("wds_tok")
    paddle.seed(0)
    r = load_recipe("tokenizers/digits_vision_b4.yaml", [f"output={root / 'vision.safetensors'}", "vision.channels=8"])
    save_asset(r, VisionTokenizer(r.vision), {})
    r = load_recipe("tokenizers/digits_audio.yaml", [f"output={root / 'audio.safetensors'}", "audio.channels=[4,8]",
                                                     "audio.latent_dim=8", "audio.codebook_size=16", "audio.levels=2"])
    save_asset(r, AudioTokenizer(r.audio), {})
    _, text, _ = text_assets
    return {"text_tokenizer": str(text), "vision_tokenizer": str(root / "vision.safetensors"),
            "audio_tokenizer": str(root / "audio.safetensors")}


# --------------------------------------------------------------------------------------------------- sample writing

def _image(seed, fmt="PNG", rgb=False):
    from PIL import Image

    px = np.random.default_rng(seed).integers(0, 256, (16, 16, 3) if rgb else (16, 16), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format=fmt)
    return buf.getvalue()


def _wav(seed, rate=16000, seconds=0.5, channels=1, fmt="WAV"):
    import soundfile

    t = np.arange(int(rate * seconds)) / rate
    x = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t)
    buf = io.BytesIO()
    soundfile.write(buf, np.stack([x] * channels, 1), rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def _npy_video(seed):
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(seed).integers(0, 256, (VIDEO_FRAMES, 16, 16), dtype=np.uint8))
    return buf.getvalue()


def _mp4(seed):
    import av

    frames = np.random.default_rng(seed).integers(0, 256, (VIDEO_FRAMES, 16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width = s.height = 16
        s.pix_fmt = "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _write_shard(path, samples):
    """samples: [(key, {ext: bytes})] written with webdataset's TarWriter (members key.ext, in order)."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for key, members in samples:
            w.write({"__key__": key, **members})


def _caption(text):
    return json.dumps({"caption": text, "width": 16}).encode()


# documents each good sample gives with the default tasks
IMAGE_DOCS, AUDIO_DOCS, VIDEO_DOCS = 2, 2, 1  # caption + t2i, asr + tts, t2v


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizers):
    """Three shards: all media kinds and formats, one with a corrupt JPEG and a truncated WAV."""
    root = tmp_path_factory.mktemp("wds")
    d = root / "shards"
    d.mkdir()
    _write_shard(d / "part-000.tar", [
        ("s000", {"png": _image(0), "txt": b"a noisy square"}),
        ("s001", {"jpg": _image(1, "JPEG", rgb=True), "json": _caption("a colourful square")}),
        ("s002", {"wav": _wav(2), "txt": b"a low hum"}),
        ("s003", {"npy": _npy_video(3), "txt": b"flickering noise"}),
        ("s004", {"flac": _wav(4, rate=44100, channels=2, fmt="FLAC"), "txt": b"a stereo tone"}),
    ])
    wav = _wav(6)
    _write_shard(d / "part-001.tar", [
        ("s005", {"webp": _image(5, "WEBP", rgb=True), "json": _caption("a webp square")}),
        ("s006", {"jpg": b"\xff\xd8\xff\xe0 this is not a jpeg", "txt": b"broken picture"}),
        ("s007", {"wav": wav[:len(wav) // 2], "txt": b"cut-off sound"}),
        ("s008", {"mp4": _mp4(8), "json": _caption("an mp4 clip")}),
        ("s009", {"png": _image(9), "txt": b"another square", "cls": b"3"}),
    ])
    _write_shard(d / "part-002.tar", [
        ("s010", {"png": _image(10), "wav": _wav(10), "txt": b"a square that hums"}),
        ("s011", {"png": _image(11), "txt": b"last square"}),
    ])
    good = {"s000": IMAGE_DOCS, "s001": IMAGE_DOCS, "s002": AUDIO_DOCS, "s003": VIDEO_DOCS, "s004": AUDIO_DOCS,
            "s005": IMAGE_DOCS, "s008": VIDEO_DOCS, "s009": IMAGE_DOCS, "s010": IMAGE_DOCS + AUDIO_DOCS,
            "s011": IMAGE_DOCS}
    return root, d, good


def _config(root, shard_dir, tokenizers, name, extra=""):
    cfg = root / f"{name}.yaml"
    tok = "".join(f"{k}: {v}\n" for k, v in tokenizers.items())
    cfg.write_text(f"kind: multimodal\nwebdataset:\n  paths: ['{shard_dir}/part-*.tar']\n  val_fraction: 0.3\n"
                   f"out_dir: {root / name}\n{tok}seq_len: 512\n{extra}")
    return cfg


def _files(out_dir):
    return {p.name: p.read_bytes() for p in sorted(Path(out_dir).iterdir())}


def _documents_in_rows(out_dir, split):
    """Documents actually present in the packed rows (distinct `doc` ids at non-padding positions)."""
    doc, mod = np.load(Path(out_dir) / f"{split}.doc.npy"), np.load(Path(out_dir) / f"{split}.modality.npy")
    return sum(len(np.unique(doc[r][mod[r] >= 0])) for r in range(len(doc)))


@pytest.fixture(scope="module")
def prepared(shards, tiny_tokenizers):
    """One in-process preparation with one worker (the reference the other runs are compared with)."""
    from ernie5.data.multimodal_prepare import prepare_multimodal

    root, d, _ = shards
    cfg = _config(root, d, tiny_tokenizers, "one")
    lines = []
    stats = prepare_multimodal(str(cfg), log=lines.append)
    return cfg, stats, lines, _files(root / "one")


# -------------------------------------------------------------------------------------------------------- tests

def test_corrupt_samples_are_skipped_and_named_and_good_documents_counted(shards, prepared):
    from ernie5.data.webdataset_source import WebDatasetConfig, held_out

    root, d, good = shards
    _, stats, lines, _ = prepared
    meta = json.loads((root / "one" / "meta.json").read_text())
    assert stats["packed"] and stats["units"] == 3 and stats["units_done"] == 3
    skipped = meta["skipped"]
    assert len(skipped) == 2 == stats["skipped"]
    assert skipped[0].startswith(f"{d}/part-001.tar:s006.jpg: ") and "image" in skipped[0]
    assert skipped[1].startswith(f"{d}/part-001.tar:s007.wav: ") and "truncated audio" in skipped[1]
    assert any(line.startswith("skipped ") and "s006.jpg" in line for line in lines)
    w = WebDatasetConfig(paths=["x"], val_fraction=0.3)
    want = {s: sum(n for k, n in good.items() if held_out(k, w) == (s == "val")) for s in ("train", "val")}
    assert want["train"] > 0 and want["val"] > 0  # the key split puts samples on both sides
    for split in ("train", "val"):
        assert meta["splits"][split]["documents"] == want[split] == stats[f"{split}_documents"]
        assert _documents_in_rows(root / "one", split) == want[split]
    assert meta["webdataset"]["shards"] == [str(d / f"part-00{i}.tar") for i in range(3)]
    assert meta["manifest"] is None and meta["files"]["train.token.npy"]["bytes"] > 0
    # every task's layout reached the rows: generated images / videos (scale-0 tokens), understanding inputs
    # (und_index), and audio frames
    mod = np.concatenate([np.load(root / "one" / f"{s}.modality.npy").ravel() for s in ("train", "val")])
    und = np.concatenate([np.load(root / "one" / f"{s}.und_index.npy").ravel() for s in ("train", "val")])
    assert {1, 2, 3} <= set(mod.tolist()) and (und >= 0).any()


def test_two_workers_give_identical_shards(shards, tiny_tokenizers, prepared):
    from ernie5.data.multimodal_prepare import prepare_multimodal

    root, d, _ = shards
    cfg = _config(root, d, tiny_tokenizers, "two")
    stats = prepare_multimodal(str(cfg), log=lambda line: None, workers=2)
    assert stats["units_done"] == 3 and stats["packed"]
    assert _files(root / "two") == prepared[3]


def test_partitions_cover_every_unit_once_and_pack_the_same_shards(shards, tiny_tokenizers, prepared):
    from ernie5.data.multimodal_prepare import prepare_multimodal

    root, d, _ = shards
    cfg = _config(root, d, tiny_tokenizers, "parts")
    r = run_cli("data", "prepare", str(cfg), "--partition", "0/2", timeout=300)  # the CLI passes the flag on
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert first["units_done"] == 2 and first["units_other_partitions"] == 1 and not first["packed"]
    assert not (root / "parts").exists()
    second = prepare_multimodal(str(cfg), log=lambda line: None, partition=(1, 2))
    assert second["units_done"] == 1 and second["units_skipped"] == 0 and second["packed"]
    assert first["units_done"] + second["units_done"] == 3
    assert _files(root / "parts") == prepared[3]


def test_rerun_redoes_only_the_unit_without_done_marker(shards, tiny_tokenizers, prepared):
    from ernie5.data.multimodal_prepare import prepare_multimodal

    root, d, _ = shards
    cfg, *_ = prepared
    work = next((root / "one.work").glob("units-*"))
    (work / "000001.done.json").unlink()  # as if the run had been killed while unit 1 was being written
    lines = []
    stats = prepare_multimodal(str(cfg), log=lines.append)
    assert (stats["units_done"], stats["units_skipped"]) == (1, 2)
    unit_lines = [ln for ln in lines if ln.startswith("unit ")]
    assert len(unit_lines) == 1 and "part-001.tar" in unit_lines[0]
    assert _files(root / "one") == prepared[3]
    again = prepare_multimodal(str(cfg), log=lambda line: None)  # nothing left to do: only the packing
    assert (again["units_done"], again["units_skipped"]) == (0, 3)
    assert _files(root / "one") == prepared[3]


def test_changed_shard_is_prepared_again(shards, tiny_tokenizers, tmp_path):
    from ernie5.data.multimodal_prepare import prepare_multimodal

    root, d, _ = shards
    mine = tmp_path / "shards"
    mine.mkdir()
    for p in d.glob("part-00[02].tar"):
        (mine / p.name).write_bytes(p.read_bytes())
    cfg = _config(tmp_path, mine, tiny_tokenizers, "changed")
    assert prepare_multimodal(str(cfg), log=lambda line: None)["units_done"] == 2
    _write_shard(mine / "part-002.tar", [("s099", {"png": _image(99), "txt": b"replaced"})])
    stats = prepare_multimodal(str(cfg), log=lambda line: None)
    assert (stats["units_done"], stats["units_skipped"]) == (1, 1)
    # part-000 (s000 - s004) and the new part-002 (s099)
    assert stats["train_documents"] + stats["val_documents"] == 3 * IMAGE_DOCS + 2 * AUDIO_DOCS + VIDEO_DOCS


def test_chunked_packing_equals_one_pack_documents_call(shards, tiny_tokenizers, prepared, monkeypatch):
    """Packing PACK_ROWS rows at a time (units reopened through a one-unit cache) writes what a single
    `pack_documents` over all documents writes."""
    import ernie5.data.multimodal_prepare as mp

    root, d, _ = shards
    monkeypatch.setattr(mp, "PACK_ROWS", 1)
    monkeypatch.setattr(mp, "OPEN_UNITS", 1)
    cfg = _config(root, d, tiny_tokenizers, "chunked", f"work_dir: {root / 'one.work'}\n")
    mp.prepare_multimodal(str(cfg), log=lambda line: None)
    assert _files(root / "chunked") == prepared[3]


def test_damaged_tar_keeps_the_samples_before_the_damage(shards, tiny_tokenizers, tmp_path):
    """A shard cut inside a member (the tar reader fails) or at a member boundary (the stream reader stops quietly;
    the missing end-of-archive blocks tell): one line naming the shard, the samples before the cut prepared."""
    from ernie5.data.multimodal_prepare import prepare_multimodal

    _, d, _ = shards
    data = (d / "part-000.tar").read_bytes()
    with tarfile.open(d / "part-000.tar") as t:
        s003 = next(m for m in t.getmembers() if m.name == "s003.npy")  # TarWriter writes members sorted by ext
    for name, cut, reason in (("inside", s003.offset_data + 100, "damaged tar"),
                              ("boundary", s003.offset, "truncated tar")):
        mine = tmp_path / name
        mine.mkdir()
        (mine / "part-000.tar").write_bytes(data[:cut])
        stats = prepare_multimodal(str(_config(tmp_path, mine, tiny_tokenizers, f"out_{name}")), log=lambda line: None)
        meta = json.loads((tmp_path / f"out_{name}" / "meta.json").read_text())
        assert len(meta["skipped"]) == 1 and meta["skipped"][0].startswith(f"{mine}/part-000.tar: {reason}"), \
            meta["skipped"]
        assert stats["train_documents"] + stats["val_documents"] == 2 * IMAGE_DOCS + AUDIO_DOCS  # s000, s001, s002


def test_sample_documents_layouts_text_and_tasks():
    from ernie5.data.webdataset_source import WebDatasetConfig, sample_documents

    w = WebDatasetConfig(paths=["x"])
    sample = {"__key__": "k", "jpg": b"J", "wav": b"W", "json": b'{"caption": "hi there", "alt": "other"}'}
    docs = sample_documents(sample, "s.tar", w)
    assert [t for t, _ in docs] == ["caption", "t2i", "asr", "tts"]
    caption, t2i = docs[0][1], docs[1][1]
    assert caption == [{"kind": "image", "bytes": b"J", "name": "s.tar:k.jpg", "role": "input"},
                       {"kind": "sep", "role": "target"}, {"kind": "text", "role": "target", "text": "hi there"}]
    assert t2i == [{"kind": "text", "role": "target", "text": "hi there"},
                   {"kind": "image", "bytes": b"J", "name": "s.tar:k.jpg", "role": "target"}]
    only = sample_documents(sample, "s.tar", WebDatasetConfig(paths=["x"], tasks=["tts"], text_field="alt"))
    assert [(t, segs[0]["text"], segs[1]["name"]) for t, segs in only] == [("tts", "other", "s.tar:k.wav")]
    assert sample_documents({**sample, "txt": b"from txt"}, "s.tar", w)[0][1][2]["text"] == "from txt"
    bad = {"no text": {"__key__": "k", "png": b"P"}, "no 'caption' field": {"__key__": "k", "png": b"P", "json": b"{}"},
           "does not parse": {"__key__": "k", "png": b"P", "json": b"{"},
           "no media member": {"__key__": "k", "txt": b"words only", "cls": b"1"},
           "empty text": {"__key__": "k", "png": b"P", "txt": b"  "}}
    for reason, s in bad.items():
        with pytest.raises(UserError, match=reason) as e:
            sample_documents(s, "s.tar", w)
        assert e.value.where == "s.tar:k"


def test_config_errors_are_one_line(shards, tiny_tokenizers, tmp_path):
    from ernie5.data.multimodal_prepare import load_multimodal_config, prepare_multimodal

    root, d, _ = shards
    cfg = _config(tmp_path, d, tiny_tokenizers, "cfg")
    for overrides, where, reason in (
            ([f"manifest={tmp_path / 'm.jsonl'}"], "manifest", "exactly one input"),
            (["webdataset=null"], "manifest", "exactly one input"),
            (["webdataset.tasks=[caption,sing]"], "webdataset.tasks[1]", "'sing' is not one of"),
            (["webdataset.val_fraction=1.5"], "webdataset.val_fraction", "must be in [0, 1)")):
        with pytest.raises(UserError) as e:
            load_multimodal_config(str(cfg), overrides)
        assert e.value.where == where and reason in e.value.reason
    with pytest.raises(UserError) as e:
        prepare_multimodal(str(cfg), [f"webdataset.paths=[{tmp_path}/none-*.tar]"])
    assert e.value.where == "webdataset.paths[0]" and "matches no file" in e.value.reason
    r = run_cli("data", "prepare", str(cfg), "webdataset=null")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "exactly one input" in r.stderr


# ------------------------------------------------------------------------------------------- JSONL manifest units

@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Seven manifest lines (captions, speech, one missing picture on line 4) over PNG / WAV files."""
    root = tmp_path_factory.mktemp("manifest")
    media = root / "media"
    media.mkdir()
    lines = []
    for i in range(7):
        if i % 3 == 2:
            (media / f"a{i}.wav").write_bytes(_wav(i))
            segs = [{"kind": "audio", "path": f"media/a{i}.wav", "role": "input"},
                    {"kind": "text", "text": f"tone {i}", "role": "target"}]
        else:
            if i != 3:
                (media / f"p{i}.png").write_bytes(_image(i))
            segs = [{"kind": "image", "path": f"media/p{i}.png", "role": "input"},
                    {"kind": "text", "text": f"square {i}", "role": "target"}]
        lines.append(json.dumps({"id": str(i), "split": "val" if i == 5 else "train", "segments": segs}))
    (root / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _manifest_config(root, tokenizers, name, unit_lines):
    cfg = root / f"{name}.yaml"
    tok = "".join(f"{k}: {v}\n" for k, v in tokenizers.items())
    cfg.write_text(f"kind: multimodal\nmanifest: {root / 'samples.jsonl'}\nout_dir: {root / name}\n{tok}"
                   f"seq_len: 512\nmanifest_unit_lines: {unit_lines}\n")
    return cfg


def test_manifest_line_units_give_the_shards_of_one_unit(manifest, tiny_tokenizers):
    """A manifest cut into 3-line units (7 lines: units 1-3, 4-6, 7), prepared by one worker and by two, packs
    the same rows as the whole manifest as one unit; the missing picture is named by its manifest line; a
    changed media file, or a line appended to the manifest, redoes only the unit whose lines they are."""
    from ernie5.data.multimodal_prepare import prepare_multimodal

    whole = prepare_multimodal(str(_manifest_config(manifest, tiny_tokenizers, "whole", 0)), log=lambda line: None)
    assert whole["units"] == 1 and whole["packed"]
    lines = []
    cut = prepare_multimodal(str(_manifest_config(manifest, tiny_tokenizers, "cut", 3)), log=lines.append)
    assert (cut["units"], cut["units_done"]) == (3, 3) and cut["packed"]
    units = [ln.split(":")[0] for ln in lines if ln.startswith("unit ")]
    assert units == [f"unit {i}/3 {manifest / 'samples.jsonl'}" for i in (1, 2, 3)]
    assert [ln for ln in lines if ln.startswith("skipped ")] == [
        ln for ln in lines if ln.startswith(f"skipped {manifest / 'samples.jsonl'}:4: ")]
    assert len([ln for ln in lines if ln.startswith("skipped ")]) == 1
    two = prepare_multimodal(str(_manifest_config(manifest, tiny_tokenizers, "two", 3)), log=lambda line: None,
                             workers=2)
    assert two["units_done"] == 3
    assert _files(manifest / "cut") == _files(manifest / "two")
    whole_files, cut_files = _files(manifest / "whole"), _files(manifest / "cut")
    metas = [json.loads(f.pop("meta.json")) for f in (whole_files, cut_files)]
    assert whole_files == cut_files  # every shard file but meta.json, which records the unit count
    assert (metas[0].pop("units"), metas[1].pop("units")) == (1, 3) and metas[0] == metas[1]
    assert (whole["train_documents"], whole["val_documents"]) == (5, 1)  # line 4 skipped, line 6 held out
    (manifest / "media" / "a5.wav").write_bytes(_wav(50))  # named on line 6: the second unit
    again = prepare_multimodal(str(_manifest_config(manifest, tiny_tokenizers, "cut", 3)), log=lambda line: None)
    assert (again["units_done"], again["units_skipped"]) == (1, 2)
    # an appended line (not UTF-8) joins the last unit (lines 7-8): only that unit is redone, and the line is
    # skipped with one line naming it
    with open(manifest / "samples.jsonl", "ab") as f:
        f.write(b'{"id": "8", "segments": [{"kind": "text", "text": "caf\xe9"}]}\n')
    lines = []
    grown = prepare_multimodal(str(_manifest_config(manifest, tiny_tokenizers, "cut", 3)), log=lines.append)
    assert (grown["units"], grown["units_done"], grown["units_skipped"]) == (3, 1, 2)
    bad = [ln for ln in lines if ln.startswith(f"skipped {manifest / 'samples.jsonl'}:8: ")]
    assert len(bad) == 1 and "UnicodeDecodeError" in bad[0] and grown["skipped"] == 2
