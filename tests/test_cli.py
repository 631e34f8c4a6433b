"""The command line teaches: every verb's help shows examples that parse, eval has one --mode, config files are
told apart by their `kind:` and a verb given the wrong kind says so in one line; the demo summary helper."""

import argparse
import json
import shlex
import subprocess
from pathlib import Path

import pytest

from ernie5.cli import EVAL_MODE_OPTIONS, VERB_KINDS, build_parser, check_args, main, parse_args
from ernie5.config.yaml_io import CONFIG_KINDS, config_kind, require_kind
from ernie5.errors import ConfigError, UserError
from ernie5.runconfig import load_config
from ernie5.tools import summary

REPO = Path(__file__).resolve().parents[1]


def all_parsers(parser=None, path=()):
    """(command words, parser) for the top level and every verb and sub-verb."""
    parser = parser or build_parser()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, path + (name,))


def examples(help_text: str) -> list[str]:
    """The command lines of the help text's `Examples:` block."""
    lines = help_text.splitlines()
    assert "Examples:" in lines, help_text
    block = lines[lines.index("Examples:") + 1:]
    return [line.strip() for line in block if line.strip()]


def test_every_verb_has_a_description_and_examples_that_parse():
    seen = []
    for path, parser in all_parsers():
        text = parser.format_help()
        assert parser.description, f"ernie5 {' '.join(path)} has no description"
        cmds = examples(text)
        assert cmds, f"ernie5 {' '.join(path)}: no example"
        for cmd in cmds:
            words = shlex.split(cmd, comments=True)
            assert words[0] == "ernie5", cmd
            assert tuple(words[1:1 + len(path)]) == path, f"{cmd!r} is not an example of ernie5 {' '.join(path)}"
            args = parse_args(words[1:])  # argparse exits (SystemExit) on a bad example
            check_args(args)  # option combinations; paths need not exist
        seen.append(" ".join(path))
    for verb in ["", "train", "config", "plan", "bench", "export", "import", "eval", "generate", "data", "data fetch",
                 "data prepare", "data inspect", "tokenizer", "tokenizer train", "viz", "viz routing"]:
        assert verb in seen


@pytest.mark.parametrize("verb", sorted(VERB_KINDS))
def test_help_names_the_kinds_a_verb_takes(verb):
    parser = dict(all_parsers())[tuple(verb.split())]
    text = parser.format_help()
    for kind in VERB_KINDS[verb]:
        assert f"kind: {kind}" in text or f"| {kind}" in text, (verb, kind)


def test_a_bad_example_would_be_caught():
    with pytest.raises(SystemExit):
        parse_args(["train"])  # the config file is required
    with pytest.raises(SystemExit):
        parse_args(["eval", "runs/x", "--mode", "grid"])


# -- eval: one --mode -------------------------------------------------------------------------------------------
def mode_of(*argv):
    args = parse_args(["eval", "runs/x", *argv])
    check_args(args)
    return args


def test_eval_mode_defaults_and_aliases():
    assert mode_of().mode == "loss"
    assert mode_of("--mode", "elastic").mode == "elastic"
    assert mode_of("--elastic").mode == "elastic"
    assert mode_of("--crossmodal").mode == "crossmodal"
    assert mode_of("--mode", "crossmodal", "--crossmodal", "--n", "5").mode == "crossmodal"
    args = mode_of("--mode", "elastic", "--batches", "4", "--out", "o", "model.x=1")
    assert (args.batches, args.out, args.overrides) == (4, "o", ["model.x=1"])


@pytest.mark.parametrize("argv, flag", [
    (["--elastic", "--crossmodal"], "--mode"),
    (["--mode", "loss", "--elastic"], "--mode"),
    (["--n", "5"], "--n"),
    (["--elastic", "--json"], "--json"),
    (["--mode", "elastic", "--world", "w"], "--world"),
    (["--clips", "3"], "--clips"),
    (["--out", "o"], "--out"),
    (["--crossmodal", "--batches", "4"], "--batches"),
])
def test_eval_refuses_options_of_another_mode(argv, flag):
    with pytest.raises(UserError) as e:
        mode_of(*argv)
    assert e.value.where == flag


def test_eval_mode_options_table_covers_every_mode_option():
    parser = dict(all_parsers())[("eval",)]
    mode_specific = {opt for a in parser._actions for opt in a.option_strings
                     if a.help and a.help.split(":")[0] in ("crossmodal", "loss, elastic", "elastic")}
    assert mode_specific <= set(EVAL_MODE_OPTIONS)


def test_eval_wrong_mode_option_is_one_line_exit_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--n", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --n: only applies with --mode crossmodal (this is --mode loss)"


# -- config kinds -----------------------------------------------------------------------------------------------
def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_config_kind(tmp_path):
    assert config_kind(write(tmp_path / "a.yaml", "run: {seed: 1}\n")) == "run"
    assert config_kind(write(tmp_path / "b.yaml", "kind: run\nrun: {seed: 1}\n")) == "run"
    assert config_kind(write(tmp_path / "c.yaml", "kind: multimodal\n")) == "multimodal"
    assert config_kind(write(tmp_path / "d.yaml", "base: c.yaml\nout_dir: x\n")) == "multimodal"  # via base:
    for bad in ("text", "Vision", "[1]"):
        with pytest.raises(UserError) as e:
            config_kind(write(tmp_path / "e.yaml", f"kind: {bad}\n"))
        assert "is not one of 'run', 'multimodal', 'vision', 'audio'" in e.value.reason


def test_run_config_accepts_kind_run_only(tmp_path):
    assert load_config(write(tmp_path / "a.yaml", "kind: run\n")).kind == "run"
    assert load_config(write(tmp_path / "b.yaml", "run: {seed: 3}\n")).kind == "run"
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path / "c.yaml", "kind: vision\n"))
    assert e.value.where == "kind"


def test_repo_config_files_say_what_they_are():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        expected = {"data": "multimodal", "sweeps": "sweep"}.get(path.parent.name, "run")
        assert config_kind(path) == expected, path
        if expected == "run":
            assert "\nkind: run\n" in "\n" + path.read_text(), f"{path}: no explicit `kind: run`"
    for path in sorted((REPO / "tokenizers").glob("*.yaml")):
        assert config_kind(path) in ("vision", "audio"), path


def test_require_kind_message(tmp_path):
    path = write(tmp_path / "v.yaml", "kind: vision\n")
    with pytest.raises(UserError) as e:
        require_kind(path, ("run", "multimodal"), "data prepare")
    assert e.value.line() == (f"error: {path}: kind 'vision' is a tokenizer recipe; ernie5 data prepare takes a run "
                              "config (kind: run) or a multimodal data config (kind: multimodal)")


WRONG_KIND = [  # (verb words, the file's kind): each verb refuses it before doing anything
    (["train"], "multimodal"), (["train"], "vision"), (["config"], "audio"), (["plan"], "multimodal"),
    (["bench"], "vision"), (["tokenizer", "train"], "multimodal"), (["data", "prepare"], "vision"),
    (["data", "prepare"], "audio"), (["data", "inspect"], "run"), (["data", "inspect"], "vision"),
]


@pytest.mark.parametrize("verb, kind", WRONG_KIND, ids=[f"{' '.join(v)}-{k}" for v, k in WRONG_KIND])
def test_verb_refuses_a_wrong_kind_in_one_line(tmp_path, capsys, verb, kind):
    path = write(tmp_path / "f.yaml", "" if kind == "run" else f"kind: {kind}\n")
    assert main([*verb, path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    name = " ".join(verb)
    assert err.startswith(f"error: {path}: kind '{kind}' is {CONFIG_KINDS[kind]}; ernie5 {name} takes "), err
    takes = VERB_KINDS.get(name, ("multimodal",))
    for k in takes:
        assert f"kind: {k}" in err or f"| {k}" in err, err


def test_unknown_kind_is_one_line(tmp_path, capsys):
    path = write(tmp_path / "f.yaml", "kind: multimodel\n")
    assert main(["data", "prepare", path]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: kind: 'multimodel' is not one of 'run', 'multimodal', 'vision', 'audio', 'sweep' " \
                  "(no `kind:` means a run config)\n"


def test_right_kind_goes_through(tmp_path, capsys):
    assert main(["config", write(tmp_path / "r.yaml", "kind: run\nrun: {seed: 5}\n")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kind: run\n") and "seed: 5" in out


# -- the demo summary -------------------------------------------------------------------------------------------
def write_metrics(run: Path, rows: list[dict]) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_text_summary_compares_like_with_like(tmp_path):
    rows = []
    for step in range(10, 110, 10):
        rows.append({"step": step, "loss": 9.0 - step / 100, "loss_ntp": 8.0 - step / 100, "loss_mtp_1": 8.5,
                     "tokens_per_s": 1000.0 + step, "mfu": 0.03, "moe_max_over_mean": 1.25})
    rows[4]["val_loss"] = 7.70  # step 50
    rows[-1].update(val_loss=7.40, tokens_per_s=10.0, mfu=0.0001)  # the last step pays for checkpoint + eval
    text = summary.text_summary(write_metrics(tmp_path / "run", rows))
    lines = {line[:16].strip(): line[16:].strip() for line in text.splitlines() if line.strip()}
    assert lines["train loss"].startswith("7.900 (step 10) -> 7.000 (step 100)")  # loss_ntp, not the total
    assert lines["held-out loss"] == "7.700 (step 50) -> 7.400 (step 100)   train at those steps 7.500 -> 7.000"
    # median over the 10 logged steps: (1040 + 1050) / 2, not the last step's 10
    assert lines["tokens/s"].startswith("1045   MFU 0.030 ") and "median of 10 logged steps" in lines["tokens/s"]
    assert lines["expert balance"] == "max/mean load 1.25"
    assert lines["steps"] == "100" and lines["checkpoint"] == "none"


def test_unified_summary_sums_the_modality_losses(tmp_path):
    rows = [{"step": 1, "loss": 20.0, "loss_text": 5.0, "loss_visual": 0.7, "loss_audio": 6.0, "tokens_per_s": 100.0,
             "mfu": 0.01},
            {"step": 2, "loss": 12.0, "loss_text": 2.0, "loss_visual": 0.5, "loss_audio": 3.0, "tokens_per_s": 300.0,
             "mfu": 0.03, "val_loss": 7.0},
            {"step": 3, "loss": 11.0, "loss_text": 1.0, "loss_visual": 0.4, "loss_audio": 2.0, "tokens_per_s": 200.0,
             "mfu": 0.02}]
    text = summary.unified_summary(write_metrics(tmp_path / "u", rows))
    assert "loss_text        5.000 -> 1.000" in text and "loss_audio       6.000 -> 2.000" in text
    assert "train loss       11.700 (step 1) -> 3.400 (step 3)   [text + visual + audio" in text
    assert "held-out loss    7.000 (step 2) -> 7.000 (step 2)   train at those steps 5.500 -> 5.500" in text
    assert "tokens/s         200   MFU 0.020" in text


def test_summary_reports_each_source(tmp_path):
    rows = [{"step": 1, "loss": 3.0, "loss_ntp": 2.5, "tokens_per_s": 5.0, "mfu": 0.1, "tokens_seen/web": 30,
             "tokens_seen/code": 10, "val_loss": 2.0, "val_loss/web": 1.5, "val_loss/code": 3.5},
            {"step": 2, "loss": 2.0, "loss_ntp": 1.5, "tokens_per_s": 5.0, "mfu": 0.1, "tokens_seen/web": 60,
             "tokens_seen/code": 20, "val_loss": 1.0, "val_loss/web": 0.5, "val_loss/code": 2.5}]
    text = summary.text_summary(write_metrics(tmp_path / "run", rows))
    assert "source web        60 tokens seen (75%), held-out loss 1.500 (step 1) -> 0.500 (step 2)" in text
    assert "source code       20 tokens seen (25%), held-out loss 3.500 (step 1) -> 2.500 (step 2)" in text


def test_summary_command_line(tmp_path):
    run = write_metrics(tmp_path / "run", [{"step": 1, "loss": 3.0, "loss_ntp": 2.5, "tokens_per_s": 5.0,
                                            "mfu": 0.1}])
    assert summary.main([str(run)]) == 0


def test_demo_script_uses_the_summary_tool():
    demo = (REPO / "scripts" / "demo.sh").read_text()
    assert "<<'PY'" not in demo
    assert 'python -m ernie5.tools.summary "$RUN"' in demo and 'python -m ernie5.tools.summary "$UNI" --unified' in demo
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "demo.sh")]).returncode == 0


def test_eval_modes_reach_the_right_evaluation(monkeypatch, capsys):
    import ernie5.evaluation.crossmodal as crossmodal
    import ernie5.evaluation.elastic as elastic

    calls = []
    row = {"submodel": "full", "loss": 1.5, "active_params": 10, "total_params": 20}
    monkeypatch.setattr(elastic, "evaluate_elastic",
                        lambda ckpt, out, batches, overrides, grid: calls.append(("elastic", batches, grid, out))
                        or ([row], None if not grid else Path(out or "o")))
    monkeypatch.setattr(elastic, "markdown_table", lambda rows, title: "| table |\n")
    monkeypatch.setattr(crossmodal, "evaluate_crossmodal",
                        lambda ckpt, out, n, clips, world, progress, overrides:
                        calls.append(("crossmodal", n, clips, out)) or {"path": "x/crossmodal.json"})
    monkeypatch.setattr(crossmodal, "format_table", lambda report: "scores\n")
    assert main(["eval", "r"]) == 0
    assert main(["eval", "r", "--elastic", "--batches", "3", "--out", "e"]) == 0
    assert main(["eval", "r", "--mode", "elastic"]) == 0
    assert main(["eval", "r", "--crossmodal", "--n", "7"]) == 0
    assert main(["eval", "r", "--mode", "crossmodal", "--out", "c", "--clips", "2"]) == 0
    assert calls == [("elastic", 16, False, None), ("elastic", 3, True, "e"), ("elastic", 16, True, None),
                     ("crossmodal", 7, None, None), ("crossmodal", None, 2, "c")]
    out = capsys.readouterr().out
    assert "held-out loss 1.5000" in out and "| table |" in out and "scores" in out
