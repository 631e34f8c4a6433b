"""Digits world fetch, multimodal prepare with corrupt / missing media (skip + report), inspect, CLI dispatch."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ernie5.errors import UserError
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def world(tmp_path_factory, text_assets):
    """A small digits world plus tiny trained vision / audio tokenizer assets and a multimodal data config."""
    from ernie5.data.digits_world import VOICES, fetch_digits_world

    root = tmp_path_factory.mktemp("mm")
    stats = fetch_digits_world(str(root / "world"), num_videos=20, num_images=100, eval_speech=False,
                               voices=VOICES[:3])
    assert stats["speech_engine"] in ("espeak-ng", "synthetic-tone-code")
    _, tok, _ = text_assets
    assets = {}
    for kind, extra in (("vision", ["vision.channels=8", "train.steps=3", "train.batch_size=4",
                                    "train.video_every=2", "train.video_batch_size=2"]),
                        ("audio", ["audio.channels=[4,8,8,8]", "audio.latent_dim=8", "audio.codebook_size=16",
                                   "train.steps=2", "train.batch_size=2"])):
        out = root / f"{kind}.safetensors"
        r = run_cli("tokenizer", "train", f"tokenizers/digits_{'vision_b4' if kind == 'vision' else 'audio'}.yaml",
                    f"output={out}", f"data_dir={root / 'world'}", *extra, timeout=300)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert ("psnr_db" in report) if kind == "vision" else ("snr_db" in report and "code_usage" in report)
        assets[kind] = out
    cfg = root / "mm.yaml"
    cfg.write_text(f"kind: multimodal\nmanifest: {root / 'world' / 'samples.jsonl'}\nout_dir: {root / 'shards'}\n"
                   f"text_tokenizer: {tok}\nvision_tokenizer: {assets['vision']}\naudio_tokenizer: {assets['audio']}\n"
                   "seq_len: 512\n")
    return root, cfg


def test_vision_report_and_png_written(world):
    root, _ = world
    meta = json.loads((root / "vision.json").read_text())
    assert meta["kind"] == "vision" and "baseline_mean_image_psnr_db" in meta["report"]
    assert (root / "vision.png").stat().st_size > 1000


def test_prepare_skips_corrupt_and_missing_media_and_names_the_file(world):
    root, cfg = world
    w = root / "world"
    (w / "images" / "00002.png").write_bytes(b"not a png")
    missing = w / "audio" / "00001.wav"
    shutil.move(missing, root / "moved.wav")
    try:
        r = run_cli("data", "prepare", str(cfg), "max_documents=0", timeout=300)
    finally:
        shutil.move(root / "moved.wav", missing)
    assert r.returncode == 0, r.stderr
    assert "00002.png: corrupt or unsupported image" in r.stderr and "00001.wav: audio file missing" in r.stderr
    stats = json.loads(r.stdout)
    # each item appears in every document that uses it: three for the image (caption -> image, image -> caption
    # in English and in Chinese), two for the clip (both directions)
    assert stats["skipped_documents"] == 5 and stats["train_rows"] > 0 and stats["val_rows"] > 0
    meta = json.loads((root / "shards" / "meta.json").read_text())
    assert meta["specials"]["<boi>"] == meta["text_vocab_size"]
    mod = np.load(root / "shards" / "train.modality.npy")
    assert {0, 1, 2, 3} <= set(np.unique(mod).tolist())  # text, image, video and audio all present
    scale = np.load(root / "shards" / "train.scale.npy")
    row = int(np.nonzero(((mod == 1) & (scale == 0)).any(1))[0][0])  # a row with a generated image in it
    r = run_cli("data", "inspect", str(cfg), "--row", str(row), "--max-positions", "20")
    assert r.returncode == 0, r.stderr
    assert "image" in r.stdout and "groups" in r.stdout and "scales [0, 1, 2, 3]" in r.stdout
    # the row's documents, each with its manifest line, and each picture with its bucket (here the square)
    assert "documents:" in r.stdout and "samples.jsonl:" in r.stdout
    assert "-> bucket 16x16 (center crop (0, 0, 16, 16) of 16x16), latent 8x8, scales 1x1 2x2 4x4 8x8" in r.stdout


def test_documents_caption_each_image_in_both_languages_and_never_use_evaluation_media(world):
    """Every document image is captioned in English and in Chinese (image -> caption), held-out images stay in
    the val split, the 597 evaluation images and the evaluation-only recordings appear in no document, and no
    training recording shares a voice / rate / pitch setting with the evaluation recordings."""
    from ernie5.data.digits_world import EVAL_SPEECH, caption_en, caption_zh, eval_image_indices

    root, _ = world
    w = root / "world"
    docs = [json.loads(line) for line in (w / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    labels = np.load(w / "labels.npy")
    eval_paths = {f"images/{i:05d}.png" for i in eval_image_indices()}
    und = {}
    for doc in docs:
        segs = doc["segments"]
        if segs[0].get("role") == "input" and segs[0]["kind"] == "image":
            i = int(segs[0]["path"].split("/")[1][:5])
            und.setdefault(i, set()).add(segs[-1]["text"])
            assert (doc["split"] == "val") == (i % 10 == 9)
        assert not any("eval_audio" in seg.get("path", "") for seg in segs)
        assert not any(seg.get("path") in eval_paths for seg in segs)
    assert sorted(und) == list(range(100))
    assert all(und[i] == {caption_en(int(labels[i])), caption_zh(int(labels[i]))} for i in und)
    clips = json.loads((w / "audio_index.json").read_text(encoding="utf-8"))["clips"]
    assert not {(c["voice"], c["rate"], c["pitch"]) for c in clips} & {(v, r, p) for v, r, p, _ in EVAL_SPEECH}


def test_read_errors_name_the_file(tmp_path):
    from ernie5.data.media_decode import decode_audio, decode_image, decode_video

    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG broken")
    for fn, path in ((lambda p: decode_image(p, str(p), 1), bad), (lambda p: decode_video(p, str(p), 1),
                                                                   tmp_path / "nope.npy"),
                     (lambda p: decode_audio(p, str(p), 16000), bad)):
        with pytest.raises(UserError) as e:
            fn(path)
        assert str(path) in str(e.value)


def test_tokenizer_train_bad_kind_is_a_user_error(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("kind: smell\n")
    r = run_cli("tokenizer", "train", str(p))
    assert r.returncode == 2 and "kind" in r.stderr and "Traceback" not in r.stderr


UNIFIED_TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
                "model.ffn_hidden_size=64", "model.moe.num_experts=4", "model.moe.expert_ffn_size=32",
                "model.mtp.depth=1", "train.micro_batch_size=2", "train.log_interval=1", "train.eval_interval=0",
                "checkpoint.interval=2", "objective.bit_flip_rate=0.1", "objective.modality_weighting=posterior",
                "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def mm_shards(world):
    root, cfg = world
    shards = root / "shards_train"
    r = run_cli("data", "prepare", str(cfg), f"out_dir={shards}", timeout=300)
    assert r.returncode == 0, r.stderr
    return shards


def test_unified_training_on_multimodal_shards_resumes_exactly(world, mm_shards):
    """The trainer feeds the multimodal shards to the unified model: every modality's loss is logged, and
    2 + 2 steps (resume: loader position, corruption draws, posterior running means) equal 4 straight steps."""
    root, _ = world
    shards = mm_shards

    def train(out, steps):
        r = run_cli("train", "configs/demo_unified.yaml", f"data.dir={shards}", f"run.output_dir={out}",
                    f"train.max_steps={steps}", *UNIFIED_TINY, timeout=300)
        assert r.returncode == 0, r.stderr
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    straight = train(root / "u_straight", 4)
    train(root / "u_resumed", 2)
    resumed = train(root / "u_resumed", 4)
    assert [m["loss"] for m in straight] == [m["loss"] for m in resumed]
    seen = set().union(*(m.keys() for m in straight))
    assert {"loss_text", "loss_visual", "loss_audio", "loss_mtp_1"} <= seen
    routing = [json.loads(line) for line in (root / "u_straight" / "routing.jsonl").read_text().splitlines()]
    assert {"text", "image", "audio"} <= set().union(*(r.get("load_by_modality", {}).keys() for r in routing))


def _unified_trainer(shards, out, *extra):
    from ernie5.runconfig import load_config
    from ernie5.train.trainer import Trainer

    cfg = load_config(Path("configs/demo_unified.yaml"), [f"data.dir={shards}", f"run.output_dir={out}",
                                                          *UNIFIED_TINY, "train.progress_bar=false", *extra])
    return Trainer(cfg, quiet=True)


def test_nan_inside_the_objective_skips_the_step_and_leaves_posterior_weighting_intact(world, mm_shards, tmp_path):
    """A NaN from inside the loss (the visual head) on step 2: that step is skipped, the posterior running means
    keep step 1's values, and training goes on with finite losses (before the fix, the NaN entered the running
    means inside loss() and every later step was NaN)."""
    tr = _unified_trainer(mm_shards, tmp_path / "run", "train.max_steps=4", "checkpoint.interval=0",
                          "train.max_bad_steps=2")
    real = tr.model.io.visual_logits

    def poisoned(h):
        out = real(h)
        return out * float("nan") if tr.step + 1 == 2 else out

    tr.model.io.visual_logits = poisoned
    m1 = tr.train_step()
    after_1 = dict(tr.task.objective.running)
    assert m1["loss"] is not None and set(after_1) == {"text", "visual", "audio"}
    m2 = tr.train_step()
    assert m2.get("skipped") and tr.task.objective.running == after_1
    for _ in range(2):
        m = tr.train_step()
        assert m["loss"] is not None and np.isfinite(m["loss"]), m
    assert all(np.isfinite(v) for v in tr.task.objective.running.values())
    assert tr.task.objective.running != after_1  # applied steps moved it again


def test_unified_dp2_equals_one_process_with_posterior_weighting_and_bit_flips(world, mm_shards, tmp_path):
    """2 ranks x 1 micro-batch == 1 process x 2 micro-batches, step for step, with posterior weighting (its running
    means reduced over the ranks) and bit-flip corruption (drawn per global row, so rank 1's rows are corrupted as
    the single process corrupts its second micro-batch). Before the fix each rank kept its own running means and
    both ranks drew the same flips."""
    from tests.parallel.test_distributed import launch, losses

    common = [f"data.dir={mm_shards}", *UNIFIED_TINY, "train.max_steps=4", "checkpoint.interval=0",
              "objective.bit_flip_rate=0.3", "--quiet"]
    single = tmp_path / "single"
    r = run_cli("train", "configs/demo_unified.yaml", f"run.output_dir={single}", *common,
                "train.grad_accum_steps=2", timeout=300)
    assert r.returncode == 0, r.stderr
    dp2 = tmp_path / "dp2"
    code, _, logs = launch(["configs/demo_unified.yaml", f"run.output_dir={dp2}", *common], tmp_path / "logs",
                           timeout=300)
    assert code == 0, logs
    # same data, same arithmetic up to the order of one sum over two terms (mean of rank means vs the
    # accumulated micro-batch gradients): fp32 rounding, ~1e-7 relative per step, compounded over 4 AdamW steps
    np.testing.assert_allclose(losses(dp2), losses(single), rtol=1e-5)


def _unified_parallel_equals_one_process(tmp_path, args, layout, keys):
    """`ernie5 train` of the unified model in one process and on 2 ranks with `layout`: the same `keys` logged."""
    from tests.parallel.test_tensor_parallel import launch

    one = tmp_path / "one"
    r = run_cli("train", *args, f"run.output_dir={one}", timeout=300)
    assert r.returncode == 0, r.stderr
    par = tmp_path / "parallel"
    code, logs = launch(2, [*args, f"run.output_dir={par}", *layout], tmp_path / "log")
    assert code == 0, logs

    def metrics(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in keys:
        np.testing.assert_allclose([m[key] for m in metrics(par)], [m[key] for m in metrics(one)], rtol=1e-5,
                                   err_msg=key)


def test_unified_training_under_tensor_parallel_equals_one_process(mm_shards, tmp_path):
    """The unified model on real multimodal shards, TP 2 with sequence parallelism (2 ranks): the same 4 losses
    as one process (the vocabulary is padded to an even size so it splits over the two ranks)."""
    from ernie5.data.sequence import SPECIALS

    vocab = json.loads((mm_shards / "meta.json").read_text())["text_vocab_size"] + len(SPECIALS)
    args = ["configs/demo_unified.yaml", f"data.dir={mm_shards}", "train.max_steps=4", *UNIFIED_TINY,
            "checkpoint.interval=0", f"model.vocab_size={-(-vocab // 2) * 2}", "--quiet"]
    _unified_parallel_equals_one_process(tmp_path, args, ["parallel.tensor=2"], ["loss"])


def test_unified_training_under_pipeline_parallel_equals_one_process(mm_shards, tmp_path):
    """The unified model split over 2 pipeline stages (1F1B over 2 micro-batches: modality inputs on the first,
    modality heads, MTP and posterior weighting on the last) gives the one-process losses for 4 steps."""
    args = ["configs/demo_unified.yaml", f"data.dir={mm_shards}", "train.max_steps=4", *UNIFIED_TINY,
            "train.grad_accum_steps=2", "checkpoint.interval=0", "--quiet"]
    _unified_parallel_equals_one_process(tmp_path, args, ["parallel.pipeline=2"],
                                         ["loss", "loss_text", "loss_visual", "loss_audio"])


def test_multimodal_and_text_sources_blend_by_weight(world, mm_shards, text_assets, tmp_path):
    """A multimodal shard set and a text source in one mixture: rows come from both in proportion, text rows
    train the text head, and held-out loss is reported per source."""
    from ernie5.data.prepare import prepare_text
    from ernie5.runconfig import load_config
    from ernie5.train.trainer import Trainer

    corpus, tok, _ = text_assets
    sources = (f"data.sources=[{{name: digits, format: multimodal, paths: [{mm_shards}], weight: 0.75}}, "
               f"{{name: prose, paths: [{corpus}], weight: 0.25}}]")
    overrides = [f"data.dir={tmp_path / 'mix'}", sources, f"tokenizer.model_path={tok}", "data.val_fraction=0.3",
                 f"run.output_dir={tmp_path / 'run'}", *UNIFIED_TINY, "train.progress_bar=false",
                 "train.max_steps=4", "train.eval_interval=4", "train.eval_batches=1", "objective.bit_flip_rate=0"]
    cfg = load_config(Path("configs/demo_unified.yaml"), overrides)
    prepare_text(cfg, progress=False)  # the text source only: the multimodal one is already prepared
    tr = Trainer(cfg, quiet=True)
    loader = tr.task.train_loader
    prose = loader.loaders[loader.names.index("prose")]
    seen = 0
    for _ in range(4):  # the batches the model gets: prose rows are the prose source's rows, all text
        first = loader.position
        batch = tr.task.batch(loader)
        for b in range(2):
            s, k = loader.schedule.source_of(first + b)
            if loader.names[s] == "prose":
                want = prose.row(k)
                np.testing.assert_array_equal(batch["token"].numpy()[b], want["token"])
                labels, has = batch["labels_0"].numpy()[b], want["loss_mask"][:, 0].astype(bool)
                assert has.sum() > 400 and (labels[~has] < 0).all()  # the text head learns the prose
                np.testing.assert_array_equal(labels[has], want["target"][has])
                assert (batch["modality"].numpy()[b] == 0).all() and (batch["und_index"].numpy()[b] == -1).all()
                seen += 1
    assert seen == 2
    loader.position = 0
    metrics = tr.train()
    last = metrics[-1]
    rows = {name: last[f"tokens_seen/{name}"] / 512 for name in ("digits", "prose")}
    assert rows == {"digits": 6, "prose": 2}  # 4 steps x 2 rows: within one row of 0.75 / 0.25 at every prefix
    assert {"val_loss", "val_loss/digits", "val_loss/prose"} <= set(last)
    assert last["val_loss"] == pytest.approx(0.75 * last["val_loss/digits"] + 0.25 * last["val_loss/prose"])
    assert all(np.isfinite(m["loss"]) for m in metrics)
