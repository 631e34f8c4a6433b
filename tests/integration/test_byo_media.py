"""README "Bring your own media", end to end: an image-caption WebDataset (JPEG / PNG of assorted sizes and aspect
ratios, captions in .txt and .json, fitted to three resolution buckets) and a folder of speech (FLAC and MP3 at 44.1 kHz stereo, listed in a JSONL
manifest) each go through `ernie5 data prepare`, then train one unified model as two weighted sources; the
training loss must fall and each source's tokens are counted."""

import io
import json

import numpy as np
import pytest

from tests.conftest import run_cli, tiny_overrides
from tests.data.test_webdataset import tiny_tokenizers  # noqa: F401  (a fixture)

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _photo(rng, colour, h, w, fmt):
    from PIL import Image

    px = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    px[h // 3:2 * h // 3, w // 3:2 * w // 3] = 255 - px[h // 3:2 * h // 3, w // 3:2 * w // 3]  # a square inside
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format=fmt)
    return buf.getvalue()


def _speech(path, f0, fmt):
    import soundfile

    rate = 44100
    t = np.arange(int(rate * 0.8)) / rate
    x = 0.3 * np.sin(2 * np.pi * f0 * t) * np.minimum(1, 10 * t)
    soundfile.write(str(path), np.stack([x, 0.5 * x], 1), rate, format=fmt)


@pytest.fixture(scope="module")
def byo(tmp_path_factory, tiny_tokenizers, text_assets):  # noqa: F811
    import webdataset as wds

    root = tmp_path_factory.mktemp("byo")
    rng = np.random.default_rng(0)
    (root / "captions").mkdir()
    sizes = [(40, 24), (24, 40), (30, 30), (64, 36), (17, 50)]  # any size and aspect ratio
    with wds.TarWriter(str(root / "captions" / "part-000.tar")) as sink:
        for i in range(30):
            colour = list(COLOURS)[i % 3]
            h, w = sizes[i % len(sizes)]
            sample = {"__key__": f"{i:06d}"}
            if i % 2:
                sample["jpg"] = _photo(rng, colour, h, w, "JPEG")
                sample["txt"] = f"a {colour} picture"
            else:
                sample["png"] = _photo(rng, colour, h, w, "PNG")
                sample["json"] = json.dumps({"caption": f"a {colour} picture", "source": "test"})
            sink.write(sample)
    speech = root / "speech"
    speech.mkdir()
    with open(speech / "manifest.jsonl", "w", encoding="utf-8") as f:
        for i in range(12):
            name = f"clip{i:02d}.{'flac' if i % 2 else 'mp3'}"
            _speech(speech / name, 150 + 40 * (i % 4), "FLAC" if i % 2 else "MP3")
            f.write(json.dumps({"id": f"s{i}", "split": "val" if i == 11 else "train", "segments": [
                {"kind": "audio", "path": name, "role": "input"}, {"kind": "sep"},
                {"kind": "text", "text": f"tone {i % 4}"}]}) + "\n")
    common = [f"{k}: {v}" for k, v in tiny_tokenizers.items()] + ["seq_len: 256"]
    (root / "captions.yaml").write_text("\n".join([
        "kind: multimodal", "webdataset:", f"  paths: ['{root / 'captions'}/part-*.tar']", "  val_fraction: 0.1",
        "buckets: {sizes: [[16, 16], [16, 24], [24, 16]], multiple: 4}",  # square, landscape and portrait
        f"out_dir: {root / 'shards_captions'}"] + common) + "\n")
    (root / "speech.yaml").write_text("\n".join([
        "kind: multimodal", f"manifest: {speech / 'manifest.jsonl'}", f"out_dir: {root / 'shards_speech'}"]
        + common) + "\n")
    for cfg in ("captions.yaml", "speech.yaml"):
        r = run_cli("data", "prepare", str(root / cfg), timeout=600)
        assert r.returncode == 0, r.stderr
    return root


def test_captions_and_speech_prepare_and_train_as_two_sources(byo, text_assets, tmp_path):
    from ernie5.runconfig import load_config
    from ernie5.train.trainer import Trainer

    caps = json.loads((byo / "shards_captions" / "meta.json").read_text())
    assert caps["splits"]["train"]["documents"] > 40 and not caps["skipped"]  # caption + t2i per sample
    assert caps["buckets"]["16x24"] == {"pixels": [16, 24], "latent": [8, 12],
                                        "schedule": [[1, 2], [2, 3], [4, 6], [8, 12]]}
    # generated pictures landed in all three buckets: finest-scale grids of 8x8, 8x12 and 12x8 latent cells
    scale = np.load(byo / "shards_captions" / "train.scale.npy")
    group = np.load(byo / "shards_captions" / "train.group.npy")
    pos = np.load(byo / "shards_captions" / "train.pos.npy")
    grids = set()
    for r in range(len(scale)):
        for g in np.unique(group[r][scale[r] == 3]):
            at = (group[r] == g)
            grids.add((len(np.unique(pos[r][at, 1])), len(np.unique(pos[r][at, 2]))))
    assert grids == {(8, 8), (8, 12), (12, 8)}
    sp = json.loads((byo / "shards_speech" / "meta.json").read_text())
    assert sp["splits"]["train"]["documents"] == 11 and sp["splits"]["val"]["documents"] == 1
    _, tok, _ = text_assets
    # speech first: the bit flips must read every source's maps (the captions' buckets are not the speech's)
    sources = ("data.sources=[{name: speech, paths: [%s], format: multimodal, weight: 0.4}, "
               "{name: captions, paths: [%s], format: multimodal, weight: 0.6}]"
               % (byo / "shards_speech", byo / "shards_captions"))
    overrides = tiny_overrides(tmp_path / "run", byo, tok) + [
        sources, "data.seq_len=256", "train.max_steps=12", "train.grad_accum_steps=1", "optim.warmup_steps=1",
        "objective.bit_flip_rate=0.05"]  # the bit flips read each bucket's maps
    cfg = load_config(None, overrides)
    Trainer(cfg, quiet=True).train()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5
    last = metrics[-1]
    assert last["tokens_seen/captions"] > 0 and last["tokens_seen/speech"] > 0


def _nearest_bucket(h, w, buckets):
    """Written out independently of ernie5.data.buckets: nearest aspect ratio in log ratio, then nearest area."""
    import math

    return min(buckets, key=lambda b: (round(abs(math.log(w / h) - math.log(b[1] / b[0])), 9),
                                       abs(math.log(h * w) - math.log(b[0] * b[1]))))


def test_every_picture_records_its_bucket_crop_and_schedule(byo):
    """{split}.samples.jsonl: one line per packed document, in row order, naming its tar member and, per picture,
    the bucket (the nearest aspect ratio of the picture's own size), a centred crop box, the latent grid and scale
    schedule; the grid is the one the row's tokens actually use at that offset."""
    sizes = [(40, 24), (24, 40), (30, 30), (64, 36), (17, 50)]
    buckets = [(16, 16), (16, 24), (24, 16)]
    shard = byo / "shards_captions"
    meta = json.loads((shard / "meta.json").read_text())
    assert meta["crop"] == "center" and "train.samples.jsonl" in meta["files"]
    scale, pos = np.load(shard / "train.scale.npy"), np.load(shard / "train.pos.npy")
    doc, modality = np.load(shard / "train.doc.npy"), np.load(shard / "train.modality.npy")
    records = [json.loads(x) for x in (shard / "train.samples.jsonl").read_text().splitlines()]
    assert len(records) == meta["splits"]["train"]["documents"]
    for row in range(len(doc)):  # each row's records tile its real positions, one packed document each
        mine = [r for r in records if r["row"] == row]
        ends = np.cumsum([r["length"] for r in mine])
        assert [r["offset"] for r in mine] == [0, *ends[:-1]] and ends[-1] == int((modality[row] >= 0).sum())
        for r in mine:
            ids = doc[row, r["offset"]:r["offset"] + r["length"]]
            assert (ids == ids[0]).all() and (r["offset"] == 0 or doc[row, r["offset"] - 1] != ids[0])
    seen_targets = 0
    for r in records:
        key = int(r["source"].rsplit(":", 1)[1].split("#")[0])
        assert r["source"].startswith(str(byo / "captions" / "part-000.tar")) and len(r["media"]) == 1
        m = r["media"][0]
        h, w = sizes[key % len(sizes)]
        bh, bw = _nearest_bucket(h, w, buckets)
        assert m["source_size"] == [h, w] and m["bucket"] == f"{bh}x{bw}"
        rh, rw = m["resized_size"]
        assert min(rh / bh, rw / bw) >= 1 and abs(rh / rw - h / w) < 1 / min(rh, rw) + 1e-9  # covers, aspect kept
        top, left = (rh - bh) // 2, (rw - bw) // 2
        assert m["crop_box"] == [top, left, top + bh, left + bw] and m["mode"] == "center"
        assert m["latent"] == meta["buckets"][m["bucket"]]["latent"]
        assert m["schedule"] == meta["buckets"][m["bucket"]]["schedule"]
        if m["role"] == "target":  # generated: the finest scale's tokens in this document span the latent grid
            seen_targets += 1
            sl = slice(r["offset"], r["offset"] + r["length"])
            fine = scale[r["row"], sl] == 3
            grid = [len(np.unique(pos[r["row"], sl][fine, 1])), len(np.unique(pos[r["row"], sl][fine, 2]))]
            assert grid == m["latent"], (r, grid)
    assert seen_targets > 10


def test_random_crop_is_seeded_by_the_sample_name(tiny_tokenizers, tmp_path):  # noqa: F811
    """crop: random draws the offset from the file's name: the same name gives the same box (any run, any worker),
    names differ in boxes, every box lies inside the resized picture."""
    from ernie5.data.media_tokenize import SegmentTokenizer

    tok = SegmentTokenizer(tiny_tokenizers["text_tokenizer"], tiny_tokenizers["vision_tokenizer"],
                           tiny_tokenizers["audio_tokenizer"], tmp_path, [[16, 16], [16, 32]], "random")
    px = np.random.default_rng(0).uniform(-1, 1, (1, 40, 90, 1)).astype(np.float32)
    boxes = {}
    for name in [f"img{i}.png" for i in range(8)]:
        out, rec = tok.fit(px, name)
        again, rec2 = tok.fit(px, name)
        assert rec == rec2 and np.array_equal(out, again) and out.shape == (1, 16, 32, 1)
        top, left, bottom, right = rec["crop_box"]
        assert rec["bucket"] == "16x32" and rec["mode"] == "random"
        assert 0 <= top and bottom <= rec["resized_size"][0] and 0 <= left and right <= rec["resized_size"][1]
        boxes[name] = (top, left)
    assert len(set(boxes.values())) > 1
