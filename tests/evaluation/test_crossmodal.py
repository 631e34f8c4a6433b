"""Cross-modal evaluation: the Wilson interval against scipy and hand values, the early stop of a text answer
never changes its score, batched generation equals the one-document path, the evaluation speech set is disjoint
from training, and the report table."""

import json

import numpy as np
import pytest

from ernie5.data.digits_world import (EVAL_SPEECH, TRAIN_SPEECH, VOICES, fetch_eval_speech, load_eval_speech,
                                      speech_phrases)
from ernie5.errors import UserError
from ernie5.evaluation.crossmodal import (accuracy, digit_decided, first_digit, format_table, spread,
                                          wilson_interval)
from ernie5.generation import Vocab, asr_prompt, caption_prompt, continue_text, generate_image
from tests.generation.test_generation import BITS, LEVELS, VOCAB, mm_model, tiny_vision


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (7, 20), (13, 597), (300, 600), (599, 600),
                                 (49, 500)])
def test_wilson_matches_scipy(k, n):
    from scipy.stats import binomtest

    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)


def test_wilson_hand_values():
    # p = 0.5, n = 100, z = 1.96: centre 0.5, half-width 1.96 / (1 + 0.0384) * sqrt(0.0025 + 0.0000960) = 0.0961
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.40383, abs=1e-5) and hi == pytest.approx(0.59617, abs=1e-5)
    # k = 0: the lower end is 0, the upper z^2 / (n + z^2) = 3.8415 / 13.8415
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.27753, abs=1e-5))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    r = accuracy([True, False, True, True])
    assert r["accuracy"] == 0.75 and r["correct"] == 3 and r["n"] == 4 and r["ci95"][0] < 0.75 < r["ci95"][1]


@pytest.mark.parametrize("text,decided,digit", [
    ("a handwritten se", False, None), ("a handwritten seven", False, 7), ("a handwritten seven ", True, 7),
    ("a handwritten sevens", False, None), ("手写的数字七", True, 7), ("the 4", False, 4), ("the 42", False, None),
    ("the 4 and", True, 4), ("one plus two", True, 1), ("", False, None)])
def test_early_stop_only_once_the_first_digit_is_decided(text, decided, digit):
    assert digit_decided(text) is decided and first_digit(text) == digit
    if decided:  # nothing appended changes the first digit
        for more in ("", "s", "teen", "2", " two", "九", "x seven"):
            assert first_digit(text + more) == digit


def test_spread_picks_evenly_and_all_by_default():
    assert spread(5, None).tolist() == [0, 1, 2, 3, 4] and spread(5, 9).tolist() == [0, 1, 2, 3, 4]
    assert spread(600, 3).tolist() == [0, 300, 599]


@pytest.fixture(scope="module")
def mm():
    return mm_model(seed=1)


def test_batched_greedy_text_equals_one_document_at_a_time(mm):
    from ernie5.evaluation.batched import greedy_text

    rng = np.random.default_rng(0)
    prompts = [caption_prompt(mm, rng.normal(size=(1, 4, 4, 7)).astype(np.float32), VOCAB) for _ in range(5)]
    batched = greedy_text(mm, prompts, VOCAB, max_new=10)
    for p, ids in zip(prompts, batched):
        assert continue_text(mm, p, VOCAB, max_new=10).ids == ids
    # speech prompts of one length, and an early stop that freezes a row but not the others
    codes = [rng.integers(0, 8, size=(3, LEVELS)) for _ in range(4)]
    prompts = [asr_prompt(mm, c, VOCAB) for c in codes]
    full = [continue_text(mm, p, VOCAB, max_new=8).ids for p in prompts]
    assert greedy_text(mm, prompts, VOCAB, max_new=8) == full
    stopped = greedy_text(mm, prompts, VOCAB, max_new=8, done=lambda ids: len(ids) >= 2)
    assert stopped == [f[:2] for f in full]
    # a batch must share one layout
    with pytest.raises(ValueError, match="layout"):
        greedy_text(mm, [prompts[0], caption_prompt(mm, np.zeros((1, 4, 4, 7), np.float32), VOCAB)], VOCAB)


def test_batched_images_equal_one_document_at_a_time_when_greedy(mm):
    from ernie5.evaluation.batched import generate_images

    vision = tiny_vision()
    prompt = [5, 9, 11]
    codes = generate_images(mm, prompt, 3, VOCAB, vision, temperature=0.0, rng=np.random.default_rng(0))
    one = generate_image(mm, prompt, VOCAB, vision, temperature=0.0).codes
    for k, c in enumerate(one):
        assert codes[k].shape == (3, 1, *c.shape[2:]) and codes[k].shape[-1] == BITS
        for b in range(3):
            np.testing.assert_array_equal(codes[k][b:b + 1], c)
    # sampled: every row its own draw, same shapes
    drawn = generate_images(mm, prompt, 4, Vocab(VOCAB.text_vocab_size, VOCAB.eos_id), vision, 1.0,
                            np.random.default_rng(1))
    assert len({drawn[-1][b].tobytes() for b in range(4)}) > 1


def test_eval_speech_is_disjoint_from_training_and_written(tmp_path):
    train = {(v, int(r * m), p + dp) for v, r, p in VOICES for m, dp in TRAIN_SPEECH}
    settings = {(v, r, p) for v, r, p, _ in EVAL_SPEECH}
    assert len(settings) == len(EVAL_SPEECH) and not settings & train
    known = {v for v, _, _ in VOICES}
    assert all((v in known) == (s == "known voice") for v, _, _, s in EVAL_SPEECH)
    assert len(EVAL_SPEECH) * 10 * len(speech_phrases(0)) >= 500
    with pytest.raises(UserError, match="fetch --multimodal"):
        load_eval_speech(str(tmp_path))
    stats = fetch_eval_speech(str(tmp_path), settings=EVAL_SPEECH[:1] + EVAL_SPEECH[-1:])
    index = load_eval_speech(str(tmp_path))
    assert stats["eval_speech_clips"] == len(index["clips"]) == 60
    assert {c["subset"] for c in index["clips"]} == {"known voice", "new voice"}
    assert all((tmp_path / c["file"]).stat().st_size > 1000 for c in index["clips"])
    assert [c["digit"] for c in index["clips"][:3]] == [0, 0, 0]


def test_table_shows_intervals_and_baselines():
    acc = {**accuracy([True] * 30 + [False] * 70), "majority": 0.13, "digit_counts": [10] * 10}
    r = {"checkpoint": "c", "chance": 0.1,
         "caption": {**acc, "examples": [{"digit": 3, "caption": "a handwritten three"}]},
         "asr": {**acc, "subsets": {"new voice": accuracy([True, False])},
                 "examples": [{"said": "two", "heard": "two"}]},
         "t2i": {**acc, "temperature": 1.0, "en": accuracy([True]), "zh": accuracy([False]),
                 "judge_on_reconstructions": 0.9, "judge_on_real": 0.95}, "seconds": {"total": 1.0}}
    table = format_table(r)
    assert "| image -> caption | 30.0% | 21.9-39.6% | 100 | 10.0% | 13.0% |" in table
    assert "new voices | 50.0%" in table and "seconds: total 1.0" in table
    json.dumps(r)
