"""Generation: the KV cache reproduces full re-computation, next-scale image sampling feeds each scale the
tokenizer's inputs of the sampled codes, speech stops at END or the frame limit, the cross-modal scoring rules,
and CLI errors."""

import numpy as np
import paddle
import pytest

from ernie5.data.sequence import Segment, build_document, special_ids
from ernie5.evaluation.crossmodal import first_digit, score_digit
from ernie5.generation import Stream, Vocab, asr_prompt, caption_prompt, continue_text, generate_image, generate_speech
from ernie5.generation.stream import text_rows
from ernie5.model.config import ModelConfig, MoEConfig, MultimodalConfig
from ernie5.model.transformer import build_model
from ernie5.modality.vision import VisionTokenizer, VisionTokenizerConfig
from tests.conftest import run_cli

V = 40  # text vocabulary; the 7 specials follow
EOS = 3
SCALES = [1, 2, 4]
BITS, LEVELS, BOOK = 2, 2, 8
VOCAB = Vocab(V, EOS)


def mm_model(seed=0):
    moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_size=16, layer_start=1, num_shared_experts=1)
    cfg = ModelConfig(vocab_size=V + 7, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=48, max_seq_len=256, rope_theta=100.0, moe=moe,
                      multimodal=MultimodalConfig(enabled=True, visual_bits=BITS, num_scales=len(SCALES),
                                                  audio_levels=LEVELS, audio_codebook=BOOK, und_cnn_dim=3,
                                                  und_pix_dim=4, und_patches=16, merger_heads=2))
    model = build_model(cfg, seed=seed)
    model.eval()
    return model


def text_model(seed=0):
    cfg = ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=1, ffn_hidden_size=48,
                      max_seq_len=128, rope_theta=100.0)
    model = build_model(cfg, seed=seed)
    model.eval()
    return model


def tiny_vision():
    paddle.seed(3)
    v = VisionTokenizer(VisionTokenizerConfig(image_size=8, channels=8, downsample=1, bits=BITS, scales=SCALES))
    v.eval()
    return v


@pytest.fixture(scope="module")
def mm():
    return mm_model()


def _full_logits(model, rows):
    """Reference: the whole document in one forward (no cache), text logits at every position."""
    return Stream(model, use_cache=False).feed(rows)


def _assert_same_text(model, rows, max_new=12):
    a = continue_text(model, rows, VOCAB, max_new=max_new, use_cache=True, keep_logits=True)
    b = continue_text(model, rows, VOCAB, max_new=max_new, use_cache=False, keep_logits=True)
    assert a.ids == b.ids and len(a.ids) > 0
    for x, y in zip(a.logits, b.logits):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
    return a


def test_kv_cache_matches_recompute_text_only_model():
    model = text_model()
    out = _assert_same_text(model, build_document([Segment("text", ids=[5, 9, 11, 4])], V), max_new=16)
    # and the cached hidden states equal one forward over the whole sequence with the plain text API
    ids = [5, 9, 11, 4] + out.ids
    with paddle.no_grad():
        full = model(paddle.to_tensor([ids]))[0].numpy()
        s = Stream(model)
        h = [s.feed(text_rows(ids[:4], 0, 0))]
        for t in ids[4:]:
            h.append(s.feed_text([t]))
        inc = model.logits_from_normed(paddle.concat(h)).numpy()
    np.testing.assert_allclose(inc, full, atol=1e-5, rtol=0)


def test_kv_cache_matches_recompute_unified_prompts(mm):
    rng = np.random.default_rng(0)
    und = rng.normal(size=(1, 4, 4, 7)).astype(np.float32)  # 2x2 understanding tokens, one group
    _assert_same_text(mm, caption_prompt(mm, und, VOCAB))
    _assert_same_text(mm, asr_prompt(mm, rng.integers(0, BOOK, (5, LEVELS)), VOCAB))


def test_cached_backbone_equals_full_forward_with_groups(mm):
    """Chunked feeding (a whole scale at once, bidirectional inside its group) == one full forward."""
    rng = np.random.default_rng(1)
    codes = [rng.integers(0, 2, (1, s, s, BITS)).astype(np.uint8) for s in SCALES]
    inputs = [rng.normal(size=(1, s, s, BITS)).astype(np.float32) for s in SCALES[1:]]
    latent = rng.normal(size=(1, 4, 4, BITS)).astype(np.float32)
    doc = build_document([Segment("text", ids=[7, 8]), Segment("image", codes=codes, scale_inputs=inputs,
                                                                frame_latent=latent),
                          Segment("text", ids=[EOS])], V, BITS, LEVELS)
    from ernie5.generation.stream import slice_rows

    full = _full_logits(mm, doc).numpy()
    s = Stream(mm)
    cuts = [0, 3, 4, 8, 24, 28, len(doc["token"])]  # text+BOI | scale 0 | scale 1 | scale 2 | context | EOI EOS
    parts = [s.feed(slice_rows(doc, slice(a, b))).numpy() for a, b in zip(cuts, cuts[1:])]
    np.testing.assert_allclose(np.concatenate(parts), full, atol=1e-5, rtol=0)


def test_t2i_shapes_and_next_scale_inputs(mm):
    vision = tiny_vision()
    out = generate_image(mm, [5, 6, 7], VOCAB, vision, temperature=1.0, rng=np.random.default_rng(0))
    assert [c.shape for c in out.codes] == [(1, 1, s, s, BITS) for s in SCALES]
    assert all(c.dtype == np.uint8 and set(np.unique(c)) <= {0, 1} for c in out.codes)
    np.testing.assert_array_equal(out.inputs[0], 0)
    want = vision.next_scale_inputs([paddle.to_tensor(c) for c in out.codes])
    for k in range(1, len(SCALES)):  # scale k was fed the tokenizer's inputs of the codes sampled for scales < k
        np.testing.assert_allclose(out.inputs[k][:, :BITS], want[k - 1].numpy().reshape(-1, BITS), atol=1e-6)
        np.testing.assert_array_equal(out.inputs[k][:, BITS:], 0)
    # then the context group: the complete latent of all sampled scales, 2x2 latent cells per position
    lat = vision.quantized_latent([paddle.to_tensor(c) for c in out.codes]).numpy()[0, :, 0]  # [d, 4, 4]
    want_ctx = [[lat[:, 2 * i + a, 2 * j + b] for a in (0, 1) for b in (0, 1)] for i in (0, 1) for j in (0, 1)]
    np.testing.assert_allclose(out.context, np.asarray(want_ctx).reshape(4, 4 * BITS), atol=1e-6)
    # greedy: the same with and without the cache, and bits are the thresholded logits
    a = generate_image(mm, [5, 6, 7], VOCAB, vision, temperature=0.0, use_cache=True)
    b = generate_image(mm, [5, 6, 7], VOCAB, vision, temperature=0.0, use_cache=False)
    for x, y, lx, ly in zip(a.codes, b.codes, a.logits, b.logits):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_allclose(lx, ly, atol=1e-5)
        np.testing.assert_array_equal(x.reshape(-1, BITS), (lx > 0).astype(np.uint8))
    assert vision.decode([paddle.to_tensor(c) for c in a.codes]).shape == [1, 1, 1, 8, 8]


def test_later_frames_and_text_see_the_finest_scale(mm):
    """Visible history: flipping every finest-scale bit of frame 0 leaves frame 0's own scale positions alone
    (the finest codes are what its last scale predicts) but changes every position of frame 1 and the text after
    the video (through frame 0's context group)."""
    vision = tiny_vision()
    px = np.random.default_rng(5).uniform(-1, 1, (1, 1, 2, 8, 8)).astype(np.float32)  # [B, C, T=2, H, W]
    codes = [c.numpy()[0] for c in vision.encode(paddle.to_tensor(px))]  # per scale [T, s, s, d]

    def doc_for(codes):
        t = [paddle.to_tensor(c[None]) for c in codes]
        inputs = [x.numpy()[0] for x in vision.next_scale_inputs(t)]
        latent = vision.quantized_latent(t).numpy()[0].transpose(1, 2, 3, 0)  # [T, L, L, d]
        return build_document([Segment("text", ids=[7]), Segment("video", codes=codes, scale_inputs=inputs,
                                                                 frame_latent=latent),
                               Segment("text", ids=[8, 9])], V, BITS, LEVELS)

    flipped = [c.copy() for c in codes]
    flipped[-1][0] ^= 1  # every bit of frame 0's finest scale
    base, alt = doc_for(codes), doc_for(flipped)
    h0, h1 = _full_logits(mm, base).numpy(), _full_logits(mm, alt).numpy()
    change = np.abs(h0 - h1).max(-1)
    frame, scale = base["frame"], base["scale"]
    own = (frame == 0) & (scale < len(SCALES))
    assert own.sum() == 21 and change[own].max() < 1e-6
    assert (frame == 1).sum() == 25 and (change[frame == 1] > 1e-4).all()
    after = np.arange(len(frame)) > np.nonzero(frame == 1)[0][-1]  # EOV and the text after the video
    assert after.sum() == 3 and (change[after] > 1e-4).all()


class Biased(paddle.nn.Layer):
    """A head with a fixed logit bias on END (the model's heads have none)."""

    def __init__(self, head, END):
        super().__init__()
        self.head = head
        self.bias = np.zeros(BOOK + 1, np.float32)
        self.bias[BOOK] = END

    def forward(self, h):
        return self.head(h) + paddle.to_tensor(self.bias)


def test_tts_stops_at_end_or_max_frames():
    model = mm_model(seed=1)
    out = generate_speech(model, [5, 6], VOCAB, temperature=1.0, rng=np.random.default_rng(0), max_frames=6)
    assert out.codes.shape[1] == LEVELS and 1 <= len(out.codes) <= 6
    assert out.ended == (len(out.codes) < 6)
    assert ((out.codes >= 0) & (out.codes < BOOK)).all()
    # END certain on level 1: the first frame is forced (min_frames=1), then END stops at once
    model.io.audio_heads[0] = Biased(model.io.audio_heads[0], END=1e4)
    out = generate_speech(model, [5, 6], VOCAB, temperature=1.0, max_frames=6)
    assert out.ended and len(out.codes) == 1
    # END impossible: runs to the limit
    model.io.audio_heads[0].bias[BOOK] = -1e4
    out = generate_speech(model, [5, 6], VOCAB, temperature=1.0, max_frames=4)
    assert not out.ended and out.codes.shape == (4, LEVELS)
    # cache == no cache (greedy)
    a = generate_speech(model, [5, 6], VOCAB, temperature=0.0, max_frames=5, use_cache=True)
    b = generate_speech(model, [5, 6], VOCAB, temperature=0.0, max_frames=5, use_cache=False)
    np.testing.assert_array_equal(a.codes, b.codes)


@pytest.mark.parametrize("text,want", [
    ("a handwritten seven", 7), ("手写的数字七", 7), ("Seven plus zero", 7), ("the number three plus six", 3),
    ("nine", 9), ("手写的数字零", 0), ("someone", None), ("", None), ("eighteen", None), ("7", 7),
    ("数字二加五", 2),
])
def test_first_digit(text, want):
    assert first_digit(text) == want


def test_score_digit():
    assert score_digit("four plus seven", 4) and not score_digit("four plus seven", 7)
    assert not score_digit("a handwritten", 1)


def test_report_table_and_constant_answer_baseline():
    from ernie5.evaluation.crossmodal import _baselines, accuracy, format_table

    b = _baselines([3, 6, 9, 3])
    assert b["majority"] == 0.5 and b["digit_counts"][3] == 2
    report = {"checkpoint": "ck", "chance": 0.1,
              "caption": {**accuracy([True, True, False, False]), **_baselines([1, 2, 3, 4]),
                          "examples": [{"digit": 1, "caption": "a handwritten one"}]},
              "asr": {**accuracy([True, False, False, False]), **b,
                      "examples": [{"said": "three", "heard": "zero"}]},
              "t2i": {**accuracy([True] * 8 + [False] * 2), "temperature": 1.0, "en": accuracy([True]),
                      "zh": accuracy([False]), **_baselines(range(10)), "judge_on_reconstructions": 0.97,
                      "judge_on_real": 1.0}}
    table = format_table(report)
    assert "| speech -> text | 25.0% | 4.6-69.9% | 4 | 10.0% | 50.0% |" in table and "digits 3, 6, 9" in table


def test_special_ids_layout():
    sp = special_ids(V)
    assert sp["<boi>"] == V and sp["<sep>"] == V + 6


def _write_ckpt(root, model, cfg):
    from ernie5.tensor_io import save_tensors
    from ernie5.train.checkpoint import save_text, write_checkpoint

    return write_checkpoint(root / "checkpoints", 1, {"model.safetensors": save_tensors(model.state_dict()),
                                                      "config.yaml": save_text(cfg.to_yaml())}, keep_last=1)


SMALL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=48", "model.max_seq_len=64", "data.seq_len=32"]


def test_cli_generate_text_only_checkpoint(tmp_path, text_assets):
    from ernie5.runconfig import load_config

    _, tok, shards = text_assets
    cfg = load_config(None, [f"tokenizer.model_path={tok}", f"data.dir={shards}", "model.vocab_size=600"] + SMALL)
    _write_ckpt(tmp_path / "run", build_model(cfg.model, seed=0), cfg)
    r = run_cli("generate", str(tmp_path / "run"), "--prompt", "The", "--max-new", "5", timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The")
    r = run_cli("generate", str(tmp_path / "run"), "--task", "t2i", "--prompt", "x", timeout=180)
    assert r.returncode == 2 and "multimodal checkpoint" in r.stderr and r.stderr.strip().count("\n") == 0


def test_cli_multimodal_checkpoint_without_shard_meta(tmp_path):
    from ernie5.runconfig import load_config

    mm = [f"model.vocab_size={V + 7}", "model.multimodal.enabled=true", f"model.multimodal.visual_bits={BITS}",
          f"model.multimodal.num_scales={len(SCALES)}", f"model.multimodal.audio_levels={LEVELS}",
          f"model.multimodal.audio_codebook={BOOK}", "model.multimodal.und_cnn_dim=3",
          "model.multimodal.und_pix_dim=4", "model.multimodal.merger_heads=2", f"data.dir={tmp_path / 'none'}"]
    cfg = load_config(None, mm + SMALL)
    _write_ckpt(tmp_path / "run", build_model(cfg.model, seed=0), cfg)
    r = run_cli("generate", str(tmp_path / "run"), "--task", "tts", "--prompt", "seven", timeout=180)
    assert r.returncode == 2 and "meta.json not found" in r.stderr and r.stderr.strip().count("\n") == 0
    r = run_cli("generate", str(tmp_path / "run"), "--task", "caption", "--prompt", "x", timeout=180)
    assert r.returncode == 2 and "--input" in r.stderr


def test_cli_missing_checkpoint_exits_2(tmp_path):
    r = run_cli("generate", str(tmp_path / "nope"), "--task", "text", "--prompt", "hi", timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "error:" in r.stderr
    r = run_cli("eval", str(tmp_path / "nope"), "--crossmodal", timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "error:" in r.stderr
