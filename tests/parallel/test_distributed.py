"""Distributed runtime on 2 CPU processes over gloo, started with paddle.distributed.launch (scripts/launch.sh)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest

from ernie5.runconfig import load_config
from ernie5.model.transformer import build_model, to_tensor_batch
from ernie5.objectives.text import make_text_batch, text_loss
from ernie5.tensor_io import load_tensors
from ernie5.train.checkpoint import apply_model_state
from tests.conftest import REPO, run_cli, tiny_overrides

HERE = Path(__file__).parent
MODEL = ["model.vocab_size=97", "model.hidden_size=32", "model.num_layers=3", "model.num_heads=4",
         "model.num_kv_heads=2", "model.ffn_hidden_size=48", "model.moe.num_experts=4", "model.moe.top_k=2",
         "model.moe.expert_ffn_size=16", "model.moe.num_shared_experts=1", "model.moe.layer_start=1"]


def launch(args, log_dir, timeout=240, script=None):
    """2 processes through Paddle's launcher; returns (returncode, seconds)."""
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir)]
    cmd += [str(script), *map(str, args)] if script else [str(REPO / "ernie5" / "__main__.py"), "train", *args]
    start = time.time()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    logs = "\n".join(f.read_text()[-3000:] for f in sorted(Path(log_dir).glob("workerlog.*")))
    return p.returncode, time.time() - start, logs


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(Path(run_dir) / "metrics.jsonl")]


def test_gloo_all_to_all_matches_reference(tmp_path):
    code, _, logs = launch([], tmp_path / "log", script=HERE / "_alltoall_check.py")
    assert code == 0, logs
    assert "rank 0 ok" in logs and "rank 1 ok" in logs


def reference(tokens):
    """One process: the mean of the two ranks' losses over the same rows, its gradients and logits."""
    cfg = load_config(None, MODEL)
    with paddle.utils.unique_name.guard():
        model = build_model(cfg.model, seed=3)
    model.train()
    total = 0
    for r in range(2):
        rows = tokens[2 * r:2 * r + 2]
        total = total + text_loss(model, to_tensor_batch(make_text_batch(rows, np.zeros_like(rows), 0)), 0).total / 2
    total.backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    model.eval()
    return model, grads, model(paddle.to_tensor(tokens[:, :12])).numpy()


def assert_ranks_match_one_process(ranks, ref_logits, ref_grads) -> None:
    """Every rank's logits equal the one-process logits; the union of the ranks' synced gradients (with EP each
    expert's gradient comes from the rank holding it) equals the one-process gradients."""
    got = {}
    for z in ranks:
        np.testing.assert_allclose(z["logits"], ref_logits, atol=1e-5)
        for k in z.files:
            if k.startswith("g::"):
                got.setdefault(k[3:], z[k])
    assert got.keys() == ref_grads.keys()
    for k, g in ref_grads.items():
        np.testing.assert_allclose(got[k], g, rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("expert", [1, 2])
def test_dp2_and_ep2_gradients_and_logits_equal_one_process(tmp_path, expert):
    code, _, logs = launch([tmp_path, *MODEL, f"parallel.expert={expert}"], tmp_path / "log",
                           script=HERE / "_ep_check.py")
    assert code == 0, logs
    tokens = np.random.default_rng(7).integers(0, 97, (4, 13))
    model, ref_grads, ref_logits = reference(tokens)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    assert_ranks_match_one_process(ranks, ref_logits, ref_grads)
    assert float(ranks[0]["norm"]) == pytest.approx(float(ranks[1]["norm"]), rel=1e-6)
    # resharding: the two ranks' shares (global names) load into a one-process model and give the same logits
    state = {}
    for r in range(2):
        state.update(load_tensors(tmp_path / f"model.rank{r}.safetensors"))
    apply_model_state(model, state, "ranks")
    model.eval()
    tokens12 = paddle.to_tensor(tokens[:, :12])
    np.testing.assert_allclose(model(tokens12).numpy(), ranks[0]["logits"], atol=1e-5)


def test_ep2_native_alltoall_branch_equals_one_process(tmp_path):
    """The dispatcher's native all-to-all branch (the one NCCL runs), on gloo through a stand-in for
    alltoall_single (see _ep_check.py): same logits and gradients as one process, forward and backward."""
    code, _, logs = launch([tmp_path, *MODEL, "parallel.expert=2", "--native"], tmp_path / "log",
                           script=HERE / "_ep_check.py")
    assert code == 0, logs
    tokens = np.random.default_rng(7).integers(0, 97, (4, 13))
    _, ref_grads, ref_logits = reference(tokens)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    # 2 MoE layers x 2 exchanges (dispatch, combine) x (training forward, its backward, eval forward) = 12:
    # every exchange, backward included, went through the native branch
    assert [int(z["native_calls"]) for z in ranks] == [12, 12]
    assert_ranks_match_one_process(ranks, ref_logits, ref_grads)


@pytest.fixture
def train_args(tmp_path, text_assets):
    _, tok, shards = text_assets

    def make(run, *extra):
        return ["configs/tiny_text.yaml", *tiny_overrides(run, shards, tok), "checkpoint.interval=2", "--quiet",
                *extra]
    return make


def test_aux_free_bias_update_uses_the_loads_of_both_ranks(tmp_path, text_assets):
    """DP=2, 2 micro-batches per step: after every step each rank's router bias equals bias_before + u *
    sign(mean(L) - L), L the expert loads summed over both micro-batches of both ranks (counted by router hooks
    in _bias_check.py), and the two ranks hold the same bias."""
    _, tok, shards = text_assets
    u = 1e-3
    args = [tmp_path, *tiny_overrides(tmp_path / "run", shards, tok), "train.max_steps=3",
            "train.grad_accum_steps=2", f"model.moe.bias_update_rate={u}"]
    code, _, logs = launch(args, tmp_path / "log", script=HERE / "_bias_check.py")
    assert code == 0, logs
    r0, r1 = (np.load(tmp_path / f"bias.rank{r}.npz") for r in range(2))
    assert r0["loads"].shape == (3, 2, 4)  # steps x MoE layers x experts
    np.testing.assert_array_equal(r0["after"], r1["after"])  # identical on both ranks
    np.testing.assert_array_equal(r0["before"], r1["before"])
    total = r0["loads"] + r1["loads"]
    want = r0["before"] + np.float32(u) * np.sign(total.mean(-1, keepdims=True) - total).astype(np.float32)
    np.testing.assert_allclose(r0["after"], want, rtol=0, atol=1e-9)
    # the data make the check decisive: one rank's loads alone would have moved some bias the other way
    one_rank = [np.sign(r["loads"].mean(-1, keepdims=True) - r["loads"]) for r in (r0, r1)]
    assert any((s != np.sign(total.mean(-1, keepdims=True) - total)).any() for s in one_rank)


def test_training_dp2_ep2_resume_and_reshard(tmp_path, train_args):
    """DP=2 x 4 rows == 1 process x 8 rows; an EP=2 checkpoint resumes at EP=1 / DP=1 and vice versa."""
    single = tmp_path / "single"
    assert run_cli("train", *train_args(single, "train.max_steps=4", "train.grad_accum_steps=4")).returncode == 0
    ep2 = tmp_path / "ep2"
    code, _, logs = launch(train_args(ep2, "train.max_steps=4", "parallel.expert=2"), tmp_path / "l1")
    assert code == 0, logs
    np.testing.assert_allclose(losses(ep2), losses(single), rtol=1e-5)
    # EP=2 / DP=2 checkpoint at step 2 -> one process (EP=1, DP=1)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(ep2 / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    p = run_cli("train", *train_args(resumed, "train.max_steps=4", "train.grad_accum_steps=4"))
    assert p.returncode == 0 and "step_00000002" in p.stderr, p.stderr
    np.testing.assert_allclose(losses(resumed)[-2:], losses(ep2)[2:], rtol=1e-5)
    # one-process checkpoint at step 2 -> EP=2 / DP=2
    back = tmp_path / "back"
    (back / "checkpoints").mkdir(parents=True)
    shutil.copytree(single / "checkpoints" / "step_00000002", back / "checkpoints" / "step_00000002")
    code, _, logs = launch(train_args(back, "train.max_steps=4", "parallel.expert=2"), tmp_path / "l2")
    assert code == 0, logs
    np.testing.assert_allclose(losses(back)[-2:], losses(single)[2:], rtol=1e-5)


def test_sharding_stage1_matches_plain_dp(tmp_path, train_args):
    dp = tmp_path / "dp"
    code, _, logs = launch(train_args(dp, "train.max_steps=3"), tmp_path / "l1")
    assert code == 0, logs
    zero1 = tmp_path / "zero1"
    code, _, logs = launch(train_args(zero1, "train.max_steps=3", "parallel.sharding_stage=1"), tmp_path / "l2")
    assert code == 0, logs
    np.testing.assert_allclose(losses(zero1), losses(dp), rtol=1e-5)
    files = sorted(p.name for p in (zero1 / "checkpoints" / "step_00000002").iterdir())
    assert "optimizer.rank1.safetensors" in files  # each rank wrote its shard of the optimizer state


def test_a_dead_rank_takes_the_job_down_and_restart_resumes(tmp_path, train_args):
    run = tmp_path / "r"
    code, seconds, _ = launch(train_args(run, "train.max_steps=6", "faults.crash_rank=1", "faults.crash_at_step=4"),
                              tmp_path / "l1", timeout=180)
    assert code != 0 and seconds < 150  # the launcher stops the surviving rank, no hang
    code, _, logs = launch(train_args(run, "train.max_steps=6"), tmp_path / "l2")
    assert code == 0, logs
    assert [json.loads(l)["step"] for l in open(run / "metrics.jsonl")] == list(range(1, 7))
    assert "resumed" in (run / "events.jsonl").read_text()


def test_mis_sized_topology_exits_2(train_args, tmp_path):
    p = run_cli("train", *train_args(tmp_path / "x", "parallel.data=2"))
    assert p.returncode == 2
    assert p.stderr.strip() == "error: parallel: data 2 x tensor 1 x pipeline 1 = 2, but 1 processes were launched"
    p = run_cli("train", *train_args(tmp_path / "y", "parallel.expert=3"))
    assert p.returncode == 2 and "parallel.expert: 3 does not divide model.moe.num_experts 4" in p.stderr


@pytest.mark.parametrize("mode,zero1", [("both", False), ("both", True), ("one", True)])
def test_parameters_without_gradient_are_skipped_as_in_one_process(tmp_path, mode, zero1):
    """A layer no rank ran (elastic depth cut on both ranks) is left untouched by AdamW (no momentum, no weight
    decay), as one process leaves it; a layer only one rank ran is updated from that rank's gradient and zeros,
    as one process running both halves updates it. Before the fix, every rank zero-filled missing gradients and
    AdamW decayed the skipped layer (its q_proj moved by ~lr x weight_decay x |w|)."""
    from tests.parallel._nograd_check import batches, submodel_of

    overrides = [*MODEL, "model.moe.bias_update_rate=0", "optim.weight_decay=0.1"]
    extra = ["parallel.sharding_stage=1"] if zero1 else []
    code, _, logs = launch([tmp_path, mode, *overrides, *extra], tmp_path / "logs", script=HERE / "_nograd_check.py")
    assert code == 0, logs
    # one process: both ranks' micro-batches, each loss halved (the ranks' gradients are averaged)
    cfg = load_config(None, overrides)
    with paddle.utils.unique_name.guard():
        model = build_model(cfg.model, seed=3)
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    from ernie5.parallel.runtime import ParallelRuntime
    from ernie5.parallel.topology import init_topology

    runtime = ParallelRuntime(model, cfg.optim, init_topology(cfg.parallel, world=1))
    model.train()
    for r, b in enumerate(batches(cfg, 2)):
        (text_loss(model, b, 0.0, submodel=submodel_of(r, mode)).total / 2).backward()
    runtime.step(1e-2)
    want = {k: v.numpy() for k, v in model.state_dict().items()}
    skipped = [k for k in want if k.startswith("layers.1.")]
    assert skipped
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for k in skipped:
            if mode == "both":  # nobody ran layer 1: bit-identical to its initial value
                np.testing.assert_array_equal(got[k], before[k], err_msg=k)
            else:
                assert not np.array_equal(got[k], before[k]) or "bias" in k, k
        for k, v in want.items():  # the same AdamW step from the same averaged gradient; fp32 sums in
            # another order move an element by a few ulp of lr (1e-2): 1e-6 absolute leaves a wide margin
            np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
