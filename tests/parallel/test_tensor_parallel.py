"""Tensor and sequence parallelism on 2 and 4 CPU processes over gloo, against the one-process computation.

`_tp_check.py` compares one forward / backward (loss terms, logits, every parameter's gradient, the gradient norm,
the initial shards) with the same model in one process; the training tests compare the losses of whole runs
(`ernie5 train` under paddle.distributed.launch) with a one-process run, and checkpoints across layouts."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, run_cli, tiny_overrides

HERE = Path(__file__).parent
# a text MoE with MTP, shared experts and all three balancing losses (their reduction over sequence shards)
MODEL = ["model.vocab_size=96", "model.hidden_size=32", "model.num_layers=3", "model.num_heads=4",
         "model.num_kv_heads=2", "model.ffn_hidden_size=48", "model.moe.num_experts=4", "model.moe.top_k=2",
         "model.moe.expert_ffn_size=16", "model.moe.num_shared_experts=1", "model.moe.layer_start=1",
         "model.mtp.depth=1", "data.seq_len=16"]
AUX = ["model.moe.aux_loss_coef=0.01", "model.moe.z_loss_coef=0.001", "model.moe.seq_aux_loss_coef=0.01"]


def launch(nproc, args, log_dir, script=None, timeout=300):
    """`nproc` processes through Paddle's launcher; returns (returncode, logs)."""
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--log_dir",
           str(log_dir)]
    cmd += [str(script), *map(str, args)] if script else [str(REPO / "ernie5" / "__main__.py"), "train", *args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    logs = "\n".join(f.read_text()[-4000:] for f in sorted(Path(log_dir).glob("workerlog.*")))
    return p.returncode, logs


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(Path(run_dir) / "metrics.jsonl")]


@pytest.mark.parametrize("nproc,layout", [
    (2, ["parallel.tensor=2", *AUX]),  # sequence parallel on (the default)
    (2, ["parallel.tensor=2", "parallel.sequence_parallel=false", *AUX]),
    (4, ["parallel.tensor=4", *AUX]),  # 2 kv heads over 4 ranks: each kv head replicated on 2
    (4, ["parallel.tensor=2"]),  # x DP 2 (no balancing loss: a per-rank Switch loss is not the batch's)
    (4, ["parallel.tensor=2", "parallel.expert=2"]),  # x EP 2 over the data ranks of each TP rank
    (2, ["parallel.tensor=2", "--unified", "data.seq_len=48"]),  # text + image + audio, kv head replicated
    (2, ["parallel.tensor=2", "--bf16", *AUX]),  # emulated bf16: the loss within 4u of one process's
], ids=["tp2", "tp2-no-sp", "tp4-kv-replicated", "tp2xdp2", "tp2xep2", "tp2-unified", "tp2-bf16"])
def test_forward_backward_equals_one_process(tmp_path, nproc, layout):
    extra = MODEL if "--unified" not in layout else []
    code, logs = launch(nproc, [*extra, *layout], tmp_path / "log", script=HERE / "_tp_check.py")
    assert code == 0, logs
    assert logs.count("TP_CHECK_DONE") == nproc, logs
    for name in ("init", "bf16_loss") if "--bf16" in layout else ("init", "loss", "grad_norm", "logits", "model_state"):
        assert f"CHECK {name} " in logs, name


@pytest.fixture
def train_args(text_assets):
    _, tok, shards = text_assets

    def make(run, *extra):
        return ["configs/tiny_text.yaml", *tiny_overrides(run, shards, tok), "checkpoint.interval=3", "--quiet",
                "model.moe.aux_loss_coef=0.01", *extra]
    return make


def test_training_tp2_equals_one_process_and_checkpoints_reshard(tmp_path, train_args):
    """6 steps under TP 2 (sequence parallel) give the one-process losses; the TP 2 checkpoint of step 3 resumes
    in one process with the uninterrupted losses, and the one-process checkpoint resumes under TP 2."""
    single = tmp_path / "single"
    assert run_cli("train", *train_args(single, "train.max_steps=6")).returncode == 0
    tp2 = tmp_path / "tp2"
    code, logs = launch(2, train_args(tp2, "train.max_steps=6", "parallel.tensor=2"), tmp_path / "l1")
    assert code == 0, logs
    np.testing.assert_allclose(losses(tp2), losses(single), rtol=1e-5)
    for src, dst, nproc in ((tp2, tmp_path / "to_tp1", 1), (single, tmp_path / "to_tp2", 2)):
        (dst / "checkpoints").mkdir(parents=True)
        shutil.copytree(src / "checkpoints" / "step_00000003", dst / "checkpoints" / "step_00000003")
        extra = ("train.max_steps=6",) if nproc == 1 else ("train.max_steps=6", "parallel.tensor=2")
        if nproc == 1:
            p = run_cli("train", *train_args(dst, *extra))
            assert p.returncode == 0 and "step_00000003" in p.stderr, p.stderr
        else:
            code, logs = launch(2, train_args(dst, *extra), tmp_path / "l2")
            assert code == 0, logs
        np.testing.assert_allclose(losses(dst)[-3:], losses(single)[3:], rtol=1e-5)


@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.tensor=2", "parallel.expert=2"],
                                    ["parallel.tensor=2", "parallel.sharding_stage=1"]],
                         ids=["tp2xdp2", "tp2xep2", "tp2xzero1"])
def test_training_on_4_ranks_equals_one_process(tmp_path, train_args, layout):
    """TP 2 x DP 2 (4 rows per rank; plain, with EP 2, with ZeRO-1) == one process with 8 rows per micro-batch,
    for 6 steps."""
    single = tmp_path / "single"
    base = ("train.max_steps=6", "model.moe.aux_loss_coef=0")  # a per-rank Switch loss is not the batch's
    assert run_cli("train", *train_args(single, *base, "train.micro_batch_size=8")).returncode == 0
    run = tmp_path / "tp"
    code, logs = launch(4, train_args(run, *base, *layout), tmp_path / "l")
    assert code == 0, logs
    np.testing.assert_allclose(losses(run), losses(single), rtol=1e-5)


@pytest.mark.parametrize("override,message", [
    (["model.num_heads=1", "model.num_kv_heads=1"], "model.num_heads: 1 is not divisible by parallel.tensor 2"),
    (["model.ffn_hidden_size=63"], "model.ffn_hidden_size: 63 is not divisible by parallel.tensor 2"),
    (["data.seq_len=31"], "data.seq_len: 31 is not divisible by parallel.tensor 2 (sequence parallelism splits "
                          "each row)"),
    (["parallel.data=2"], "parallel: data 2 x tensor 2 x pipeline 1 = 4, but 1 processes were launched"),
])
def test_bad_tensor_parallel_layouts_exit_2(train_args, tmp_path, override, message):
    p = run_cli("train", *train_args(tmp_path / "x", "parallel.tensor=2", *override))
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == f"error: {message}", p.stderr


def test_kv_heads_that_cannot_be_split_exit_2(train_args, tmp_path):
    p = run_cli("train", *train_args(tmp_path / "x", "parallel.tensor=4", "model.num_heads=12",
                                     "model.num_kv_heads=3", "model.hidden_size=48"))
    assert p.returncode == 2
    assert "model.num_kv_heads: 3 kv heads cannot be split over parallel.tensor 4" in p.stderr
