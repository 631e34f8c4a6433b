"""Training on a weighted mixture of prepared sources: tokens seen and held-out loss per source, the mixture's
overall held-out loss, exact resume with three sources, and errors for sources that cannot blend."""

import json

import pytest

from tests.conftest import run_cli, tiny_overrides

WEIGHTS = {"english": 0.5, "chinese": 0.3, "mixed": 0.2}


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, text_assets):
    """Three text sources in three formats (text, JSONL, Parquet), prepared into one data.dir."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ernie5.data.corpus import pydoc_documents
    from ernie5.data.prepare import prepare_text
    from ernie5.runconfig import load_config

    root = tmp_path_factory.mktemp("mixture")
    _, tok, _ = text_assets
    english = pydoc_documents()[:60]
    (root / "english.txt").write_text("\n".join(english) + "\n", encoding="utf-8")
    chinese = [f"人民日报一九九八年第{i}期。今天是新年的第{i}天，天气晴朗。" * 3 for i in range(80)]
    with open(root / "chinese.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(chinese):
            f.write(json.dumps({"id": i, "body": d}, ensure_ascii=False) + "\n")
    pq.write_table(pa.table({"text": [e[:300] + " " + c for e, c in zip(english, chinese)]}), root / "mixed.parquet")
    sources = ("data.sources=[{name: english, paths: [%s], weight: 0.5}, "
               "{name: chinese, paths: [%s], field: body, weight: 0.3}, "
               "{name: mixed, paths: [%s], weight: 0.2}]" % (root / "english.txt", root / "chinese.jsonl",
                                                             root / "mixed.parquet"))
    overrides = tiny_overrides(root / "run", root / "shards", tok) + [sources, "data.val_fraction=0.15"]
    prepare_text(load_config(None, overrides), progress=False)
    return root, overrides


def _train(overrides, out, steps, *extra):
    from ernie5.runconfig import load_config
    from ernie5.train.trainer import Trainer

    cfg = load_config(None, overrides + [f"run.output_dir={out}", f"train.max_steps={steps}", "train.eval_interval=3",
                                         "train.eval_batches=1", "checkpoint.interval=2", *extra])
    Trainer(cfg, quiet=True).train()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_mixture_logs_tokens_and_held_out_loss_per_source_and_resumes_exactly(mixture, tmp_path):
    root, overrides = mixture
    straight = _train(overrides, tmp_path / "straight", 6)
    S, rows_per_step = 32, 4 * 2  # data.seq_len, micro_batch x grad_accum (one rank)
    for m in straight:  # within one row of each weight's share at every logged step
        seen = {name: m[f"tokens_seen/{name}"] for name in WEIGHTS}
        assert sum(seen.values()) == m["step"] * rows_per_step * S
        for name, w in WEIGHTS.items():
            assert abs(seen[name] / S - w * m["step"] * rows_per_step) < 1
    evals = [m for m in straight if "val_loss" in m]
    assert [m["step"] for m in evals] == [3, 6]
    for m in evals:  # the overall held-out loss is the mixture's: the sources' losses weighted by their weights
        per = {name: m[f"val_loss/{name}"] for name in WEIGHTS}
        assert len(set(per.values())) == 3
        assert m["val_loss"] == pytest.approx(sum(WEIGHTS[n] * per[n] for n in WEIGHTS), rel=1e-6)
    from ernie5.evaluation.elastic import evaluate_elastic  # `ernie5 eval` of the mixture: the same numbers

    row = evaluate_elastic(str(tmp_path / "straight"), batches=1, grid=False)[0][0]
    for key in ["val_loss"] + [f"val_loss/{name}" for name in WEIGHTS]:
        assert row[key.replace("val_", "")] == pytest.approx(straight[-1][key], rel=1e-5)
    _train(overrides, tmp_path / "resumed", 4)
    resumed = _train(overrides, tmp_path / "resumed", 6)  # resumes from the step-4 checkpoint
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]
    assert resumed[-1]["tokens_seen/mixed"] == straight[-1]["tokens_seen/mixed"]


def test_a_small_source_wraps_into_a_new_epoch_with_one_event(mixture, tmp_path):
    from ernie5.data.prepare import prepare_text
    from ernie5.runconfig import load_config

    root, overrides = mixture
    tiny = tmp_path / "tiny.txt"  # ~10 rows of 32 tokens: runs out within 2 steps at half the mixture
    tiny.write_text("\n".join(f"Short document number {i} about the import statement." for i in range(30)) + "\n")
    sources = (f"data.sources=[{{name: english, paths: [{root / 'english.txt'}], weight: 1}}, "
               f"{{name: tiny, paths: [{tiny}], weight: 1}}]")
    base = [o for o in overrides if not o.startswith(("data.sources=", "data.dir="))]
    over = base + [sources, f"data.dir={tmp_path / 'shards'}"]
    prepare_text(load_config(None, over), progress=False)
    out = tmp_path / "wrap"
    _train(over, out, 6, "train.eval_interval=0")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    wraps = [e for e in events if e["event"] == "source_epoch"]
    assert wraps and all(e["source"] == "tiny" for e in wraps)
    assert [e["epoch"] for e in wraps] == list(range(2, 2 + len(wraps)))  # each new epoch told once, in order


def test_bad_mixtures_exit_2_with_one_line(mixture, tmp_path):
    _, overrides = mixture
    base = [o for o in overrides if not o.startswith("data.sources=")] + [f"run.output_dir={tmp_path}"]
    for sources, words in (("[{name: a, paths: [x.txt], weight: -1}]", ("weight", "-1")),
                           ("[{name: a, paths: [x.txt], weight: 0}]", ("every weight is 0",)),
                           ("[{name: nowhere, paths: [x.txt]}]", ("nowhere", "data prepare"))):
        r = run_cli("train", "configs/tiny_text.yaml", *base, f"data.sources={sources}")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and all(w in r.stderr for w in words), r.stderr


def test_blending_needs_one_text_tokenizer_and_one_multimodal_layout(text_assets):
    from ernie5.data.shards import sha256_file
    from ernie5.errors import UserError
    from ernie5.train.unified_data import check_same_layout, check_text_tokenizer

    _, tok, _ = text_assets
    mm = {"text_vocab_size": 600, "eos_id": 3, "seq_len": 512, "bits": 4, "scales": [1, 2, 4, 8],
          "text_tokenizer": str(tok)}
    check_text_tokenizer(mm, {"vocab_size": 600, "eos_id": 3, "tokenizer_sha256": sha256_file(tok)}, "text")
    with pytest.raises(UserError, match="another tokenizer than the multimodal shards'"):
        check_text_tokenizer(mm, {"vocab_size": 600, "eos_id": 3, "tokenizer_sha256": "0" * 64}, "text")
    with pytest.raises(UserError, match="text vocab_size 8000 != the multimodal shards' 600"):
        check_text_tokenizer(mm, {"vocab_size": 8000, "eos_id": 3}, "text")
    check_same_layout(mm, dict(mm), "more")
    with pytest.raises(UserError, match=r"data.sources \(more\).*scales"):
        check_same_layout(mm, dict(mm, scales=[1, 2, 4]), "more")
