"""The foundation issue's acceptance checks, through the CLI, on the real demo corpus."""

import json

import pytest

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    raw, tok, shards = root / "raw", root / "text.model", root / "shards"
    over = [f"tokenizer.model_path={tok}", f"data.dir={shards}",
            f"tokenizer.corpus=[{raw}/pydoc_topics.txt, {raw}/peoples_daily_1998.txt]",
            f"data.sources=[{{name: pydoc, paths: [{raw}/pydoc_topics.txt], weight: 0.3}}, "
            f"{{name: peoples_daily, paths: [{raw}/peoples_daily_1998.txt], weight: 0.7}}]"]  # the demo's mixture
    for args in (["data", "fetch", "--out", str(raw)], ["tokenizer", "train", "configs/tiny_text.yaml", *over],
                 ["data", "prepare", "configs/tiny_text.yaml", *over]):
        p = run_cli(*args)
        assert p.returncode == 0, p.stderr
    return over


def metric(run_dir, key="loss"):
    return [json.loads(line)[key] for line in open(run_dir / "metrics.jsonl")]


def test_tiny_text_trains_with_falling_loss(demo_data, tmp_path):
    p = run_cli("train", "configs/tiny_text.yaml", *demo_data, f"run.output_dir={tmp_path}", "train.max_steps=40",
                "--quiet")
    assert p.returncode == 0, p.stderr
    loss = metric(tmp_path)
    assert len(loss) == 8 and loss[-1] < loss[0] - 1.0, loss
    last = json.loads(open(tmp_path / "metrics.jsonl").readlines()[-1])  # the mixture, per source
    assert last["tokens_seen/pydoc"] + last["tokens_seen/peoples_daily"] == 40 * 16 * 128
    assert abs(last["tokens_seen/pydoc"] / 128 - 0.3 * 40 * 16) < 1
    assert {"val_loss", "val_loss/pydoc", "val_loss/peoples_daily"} <= set(last)
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "checkpoints" / "step_00000040").is_dir()


def test_restart_gives_bit_identical_losses(demo_data, tmp_path):
    common = ["configs/tiny_text.yaml", *demo_data, "checkpoint.interval=10", "train.log_interval=1",
              "train.eval_interval=0", "--quiet"]
    assert run_cli("train", *common, f"run.output_dir={tmp_path / 'a'}", "train.max_steps=20").returncode == 0
    assert run_cli("train", *common, f"run.output_dir={tmp_path / 'b'}", "train.max_steps=10").returncode == 0
    p = run_cli("train", *common, f"run.output_dir={tmp_path / 'b'}", "train.max_steps=20")
    assert p.returncode == 0 and "resumed from" in p.stderr and "step_00000010" in p.stderr
    a, b = metric(tmp_path / "a"), metric(tmp_path / "b")
    assert len(a) == 20 and a == b
