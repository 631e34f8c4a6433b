"""Bad input everywhere: every case exits 2 with one line naming the problem, no traceback, nothing overwritten."""

import shutil
from pathlib import Path

import pytest

from ernie5.cli import main
from tests.conftest import run_cli, tiny_overrides


@pytest.fixture(scope="module")
def world(tmp_path_factory, text_assets):
    """A trained tiny run plus damaged copies of every input kind."""
    corpus, tok, shards = text_assets
    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    base = tiny_overrides(run, shards, tok)
    assert main(["train", "configs/tiny_text.yaml", *base, "train.max_steps=2", "--quiet"]) == 0
    files = {
        "bad_yaml": "model:\n  hidden_size: [1, 2\n",
        "list_yaml": "- a\n- b\n",
        "bad_base": "base: missing.yaml\n",
    }
    for name, text in files.items():
        (root / f"{name}.yaml").write_text(text)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (root / "garbage.model").write_bytes(b"\x00not a sentencepiece model")
    for name, damage in [("truncated", "truncate"), ("flipped", "flip"), ("nometa", "meta")]:
        d = root / name
        shutil.copytree(shards, d)
        f = next(d.glob("units-*")) / "000000.train.tokens.npy"
        if damage == "truncate":
            f.write_bytes(f.read_bytes()[:-100])
        elif damage == "flip":
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0x55
            f.write_bytes(bytes(data))
        else:
            (d / "plan.json").write_text("{not json")
    corrupt_run = root / "corrupt_run"
    shutil.copytree(run, corrupt_run)
    for c in (corrupt_run / "checkpoints").iterdir():
        (c / "model.safetensors").write_bytes(b"rubbish")
    return {"root": root, "run": run, "base": base, "corpus": corpus, "tok": tok, "shards": shards,
            "corrupt_run": corrupt_run}


T = "configs/tiny_text.yaml"
CASES = [
    # (id, argv builder, expected message fragment)
    ("missing config", lambda w: ["train", "nope.yaml"], "nope.yaml: config file not found"),
    ("malformed yaml", lambda w: ["config", str(w["root"] / "bad_yaml.yaml")], "invalid YAML at line 3, column 1: expected ',' or ']'"),
    ("yaml not a mapping", lambda w: ["config", str(w["root"] / "list_yaml.yaml")], "top level must be a mapping"),
    ("missing base include", lambda w: ["config", str(w["root"] / "bad_base.yaml")], "missing.yaml: config file not found"),
    ("unknown key", lambda w: ["config", T, "model.hiden_size=8"], "model.hiden_size: unknown key (did you mean 'hidden_size'?)"),
    ("unknown section", lambda w: ["config", T, "optimizer.lr=1"], "optimizer: unknown key (did you mean 'optim'?)"),
    ("wrong type", lambda w: ["config", T, "train.max_steps=ten"], "train.max_steps: expected an integer"),
    ("wrong choice", lambda w: ["config", T, "optim.schedule=linear"], "optim.schedule: 'linear' is not one of"),
    ("top_k > experts", lambda w: ["config", T, "model.moe.top_k=99"], "model.moe.top_k: 99 > num_experts 8"),
    ("isolated without vision experts", lambda w: ["config", T, "model.moe.routing=isolated"],
     "model.moe.vision_num_experts: isolated routing needs vision experts"),
    ("isolated with expert parallel", lambda w: ["config", "configs/ablations/routing_isolated.yaml",
                                                 "parallel.expert=2"], "isolated routing runs without expert parallel"),
    ("bit flips out of range", lambda w: ["config", T, "objective.bit_flip_rate=0.7"],
     "objective.bit_flip_rate: must be in [0, 0.5)"),
    ("heads vs hidden", lambda w: ["config", T, "model.num_heads=5"], "model.num_heads: 5 does not divide hidden_size 128"),
    ("kv heads", lambda w: ["config", T, "model.num_kv_heads=3"], "model.num_kv_heads: 3 does not divide num_heads 4"),
    ("seq_len > max", lambda w: ["config", T, "data.seq_len=4096"], "data.seq_len: 4096 > model.max_seq_len 1024"),
    ("negative lr", lambda w: ["config", T, "optim.lr=-1"], "optim.lr: must be > 0"),
    ("moe past last layer", lambda w: ["config", T, "model.moe.layer_end=9"], "model.moe.layer_end: 9 is past the last layer"),
    ("bad override syntax", lambda w: ["config", T, "model.hidden_size"], "override must look like key.path=value"),
    ("missing corpus", lambda w: ["tokenizer", "train", T, "tokenizer.corpus=[/nonexistent/c.txt]",
                                  f"tokenizer.model_path={w['root']}/t.model"], "/nonexistent/c.txt: corpus file not found"),
    ("vocab too small for corpus", lambda w: ["tokenizer", "train", T, f"tokenizer.corpus=[{w['corpus']}]",
                                              "tokenizer.vocab_size=300", f"tokenizer.model_path={w['root']}/t.model"],
     "Vocabulary size is smaller than required_chars"),
    ("corpus not utf-8", lambda w: ["data", "prepare", T, "data.sources=[]", f"tokenizer.corpus=[{w['root']}/latin1.txt]",
                                    f"tokenizer.model_path={w['tok']}", f"data.dir={w['root']}/out1"], "not UTF-8 text"),
    ("missing tokenizer", lambda w: ["data", "prepare", T, f"tokenizer.model_path={w['root']}/none.model",
                                     f"data.dir={w['root']}/out2"], "tokenizer model not found"),
    ("garbage tokenizer", lambda w: ["data", "prepare", T, f"tokenizer.model_path={w['root']}/garbage.model",
                                     f"data.dir={w['root']}/out3"], "not a readable sentencepiece model"),
    ("missing shards", lambda w: ["train", T, *w["base"], f"data.dir={w['root']}/none", f"run.output_dir={w['root']}/r1"],
     "no prepared shards here"),
    ("truncated shard", lambda w: ["train", T, *w["base"], f"data.dir={w['root']}/truncated", f"run.output_dir={w['root']}/r2"],
     "truncated or resized shard"),
    ("corrupted shard", lambda w: ["train", T, *w["base"], f"data.dir={w['root']}/flipped", f"run.output_dir={w['root']}/r3"],
     "shard checksum mismatch"),
    ("garbage shard meta", lambda w: ["train", T, *w["base"], f"data.dir={w['root']}/nometa", f"run.output_dir={w['root']}/r4"],
     "unreadable shard metadata"),
    ("vocab below tokenizer", lambda w: ["train", T, *w["base"], "model.vocab_size=100", f"run.output_dir={w['root']}/r5"],
     "model.vocab_size: 100 < tokenizer vocabulary 600"),
    ("incompatible checkpoint", lambda w: ["train", T, *w["base"], "model.hidden_size=64", "train.max_steps=3"],
     "checkpoint does not match the model config"),
    ("all checkpoints corrupted", lambda w: ["train", T, *w["base"], f"run.output_dir={w['corrupt_run']}", "train.max_steps=3"],
     "all 1 checkpoints are corrupted (newest: model.safetensors has 7 bytes"),
    ("seq_len longer than data", lambda w: ["train", T, *w["base"], "data.seq_len=1000000", "model.max_seq_len=2000000",
                                            f"run.output_dir={w['root']}/r6"], "not one row of seq_len"),
    ("plan without vocab", lambda w: ["plan", T], "model.vocab_size: must be set for `plan`"),
    ("fetch nothing", lambda w: ["data", "fetch", "--no-text", "--out", f"{w['root']}/fetched"],
     "--no-text: nothing left to fetch"),
]


@pytest.mark.parametrize("name, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(world, capfd, name, argv, expected):
    before = sorted(p.name for p in (world["run"] / "checkpoints").iterdir())
    config_before = (world["run"] / "config.yaml").read_text()
    code = main([str(a) for a in argv(world)])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert sorted(p.name for p in (world["run"] / "checkpoints").iterdir()) == before  # nothing overwritten
    assert (world["run"] / "config.yaml").read_text() == config_before


def test_table_is_large_enough():
    assert len(CASES) >= 20


def test_cli_subprocess_has_no_traceback(world):
    p = run_cli("train", T, *world["base"], f"data.dir={world['root']}/truncated",
                f"run.output_dir={world['root']}/r7")
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_checksums_can_be_skipped_for_large_corpora_but_sizes_are_always_checked(world):
    """data.verify_checksums=false: a shard whose bytes changed (same size) is read; a truncated one is not."""
    common = [T, *world["base"], "train.max_steps=1", "--quiet"]
    assert main(["train", *common, f"data.dir={world['root']}/flipped", "data.verify_checksums=false",
                 f"run.output_dir={world['root']}/r8"]) == 0
    assert main(["train", *common, f"data.dir={world['root']}/truncated", "data.verify_checksums=false",
                 f"run.output_dir={world['root']}/r9"]) == 2
