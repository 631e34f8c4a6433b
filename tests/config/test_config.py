"""Config loading: types, unknown keys with hints, cross-field rules, overrides, includes, CLI exit codes."""

import pytest

from ernie5.runconfig import load_config
from ernie5.errors import ConfigError, UserError
from tests.conftest import run_cli


def err(*overrides, path=None) -> str:
    with pytest.raises(UserError) as e:
        load_config(path, list(overrides))
    return e.value.line()


@pytest.mark.parametrize("overrides, expected", [
    (["model.hiden_size=8"], "error: model.hiden_size: unknown key (did you mean 'hidden_size'?)"),
    (["model.moe.num_experts=8", "model.moe.expert_ffn_size=8", "model.moe.top_k=99"],
     "error: model.moe.top_k: 99 > num_experts 8"),
    (["model.hidden_size=abc"], "error: model.hidden_size: expected an integer, got str 'abc'"),
    (["model.hidden_size=100", "model.num_heads=3"], "error: model.num_heads: 3 does not divide hidden_size 100"),
    (["model.num_heads=4", "model.num_kv_heads=3"], "error: model.num_kv_heads: 3 does not divide num_heads 4"),
    (["optim.schedule=cosin"], "did you mean 'cosine'?"),
    (["train.progress_bar=maybe"], "error: train.progress_bar: expected true/false"),
    (["data.seq_len=9000"], "error: data.seq_len: 9000 > model.max_seq_len 4096"),
    (["model.rope_sections=[1, 2]"], "error: model.rope_sections"),
    (["model.moe=3"], "error: model.moe: expected a mapping"),
    (["model.hidden_size"], "override must look like key.path=value"),
    (["model.hidden_size.x=1"], "error: model.hidden_size: expected an integer"),
    (["run.seed=1", "run.seed.x=1"], "error: run.seed: is a value (1), not a section"),
    (["modle.hidden_size=8"], "error: modle: unknown key (did you mean 'model'?)"),
])
def test_config_errors_name_the_key(overrides, expected):
    assert expected in err(*overrides)


def test_yaml_numbers_and_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=1e-4", "model.moe.num_experts=4", "model.moe.expert_ffn_size=8",
                             "tokenizer.corpus=[a.txt, b.txt]"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.tokenizer.corpus == ["a.txt", "b.txt"]


def test_base_include_and_round_trip(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  hidden_size: 64\n  num_heads: 4\ntrain:\n  max_steps: 17\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel:\n  num_layers: 3\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.max_steps=19"])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.train.max_steps) == (64, 3, 19)
    (tmp_path / "resolved.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "resolved.yaml") == cfg  # the saved config reproduces the run's config


def test_file_errors(tmp_path):
    assert "config file not found" in err(path=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [1, 2\n")
    assert "invalid YAML at line" in err(path=bad)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    assert "circular" in err(path=tmp_path / "loop.yaml")


def test_cli_exits_2_with_one_line():
    for args, needle in [(["model.moe.top_k=99"], "model.moe.top_k: 99 > num_experts 8"),
                         (["model.hiden_size=8"], "did you mean 'hidden_size'")]:
        p = run_cli("train", "configs/tiny_text.yaml", *args)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr


def test_cli_config_prints_resolved_yaml():
    p = run_cli("config", "configs/tiny_text.yaml", "model.hidden_size=64")
    assert p.returncode == 0 and "hidden_size: 64" in p.stdout


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)
