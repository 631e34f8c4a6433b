"""Shared fixtures: a tiny corpus, tokenizer and shard set built once per test session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ernie5.env import setup

setup()  # thread settings before paddle loads

from ernie5.runconfig import load_config

REPO = Path(__file__).resolve().parents[1]

# Modules whose tests start several ranks through `paddle.distributed.launch`. Under pytest-xdist
# (`scripts/test.sh` runs `-n N --dist loadgroup`) they all go to one worker, one test at a time: the launcher's
# ports are fixed per job, and two multi-rank jobs at once would also put 4-8 processes on the cores.
RANKS_MODULES = ("tests/data/test_digits_world.py", "tests/parallel/test_distributed.py",
                 "tests/parallel/test_pipeline_parallel.py", "tests/parallel/test_tensor_parallel.py",
                 "tests/test_gpu_check.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.resolve().relative_to(REPO).as_posix() in RANKS_MODULES:
            item.add_marker(pytest.mark.xdist_group("ranks"))


def tiny_overrides(tmp: Path, data_dir: Path, tok: Path) -> list[str]:
    """A ~0.3M-parameter MoE with MTP on the session shards: fast enough for many tests."""
    return [f"run.output_dir={tmp}", f"data.dir={data_dir}", "data.sources=[]", f"tokenizer.model_path={tok}",
            "data.seq_len=32",
            "model.hidden_size=32", "model.num_layers=3", "model.num_heads=4", "model.num_kv_heads=2",
            "model.ffn_hidden_size=64", "model.moe.num_experts=4", "model.moe.top_k=2",
            "model.moe.expert_ffn_size=32", "model.moe.num_shared_experts=1", "model.moe.layer_start=1",
            "model.mtp.depth=1", "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.log_interval=1",
            "train.eval_interval=0", "train.progress_bar=false", "optim.lr=3e-3", "optim.warmup_steps=2",
            "checkpoint.interval=0", "model.moe.bias_update_rate=1e-3"]


@pytest.fixture(scope="session")
def text_assets(tmp_path_factory):
    """(corpus file, tokenizer model, shard dir) from CPython's pydoc topics plus a little Chinese."""
    from ernie5.data.corpus import pydoc_documents
    from ernie5.data.prepare import prepare_text
    from ernie5.modality.text_tokenizer import train_text_tokenizer

    root = tmp_path_factory.mktemp("text")
    corpus = root / "corpus.txt"
    docs = pydoc_documents()[:40] + ["人民日报一九九八年新年献词。今天是新年的第一天。"] * 5
    corpus.write_text("\n".join(docs) + "\n", encoding="utf-8")
    tok, shards = root / "tok.model", root / "shards"
    cfg = load_config(None, [f"tokenizer.model_path={tok}", f"tokenizer.corpus=[{corpus}]",
                             "tokenizer.vocab_size=600", f"data.dir={shards}", "data.val_fraction=0.1"])
    train_text_tokenizer(cfg.tokenizer)
    prepare_text(cfg, progress=False)
    return corpus, tok, shards


@pytest.fixture
def tiny_cfg(tmp_path, text_assets):
    _, tok, shards = text_assets

    def make(*extra):
        return load_config(None, tiny_overrides(tmp_path / "run", shards, tok) + list(extra))
    return make


def run_cli(*args, timeout=600, env=None):
    """Run `python -m ernie5 ...` and return the CompletedProcess (text)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "ernie5", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=full_env)
