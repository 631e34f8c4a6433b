"""Reliability: NaN guards, spikes and rollback, signals, SIGKILL at random points, bad input everywhere."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ernie5.cli import main
from ernie5.errors import TrainingError
from ernie5.train.callbacks import Callback
from ernie5.train.guards import SpikeDetector
from ernie5.train.trainer import Trainer
from tests.conftest import REPO, tiny_overrides


class Snapshot(Callback):
    """Parameters and router biases after every step."""

    def __init__(self):
        self.states = {}

    def on_step_end(self, tr, metrics):
        self.states[metrics["step"]] = {k: v.numpy().copy() for k, v in tr.model.state_dict().items()}


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_nan_micro_batch_skips_the_step_and_leaves_state_untouched(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=4", "faults.nan_loss_steps=[3]", "faults.nan_micro_batch=1")
    tr = Trainer(cfg, quiet=True)
    snap = Snapshot()
    tr.callbacks.append(snap)
    tr.train()
    for k, v in snap.states[2].items():
        np.testing.assert_array_equal(snap.states[3][k], v, err_msg=k)  # step 3 changed nothing
    assert any(not np.array_equal(snap.states[4][k], v) for k, v in snap.states[3].items())  # step 4 trained
    rows = {r["step"]: r for r in read_jsonl(tr.out / "metrics.jsonl")}
    assert rows[3]["skipped"] is True and rows[3]["loss"] is None and rows[4]["loss"] is not None
    ev = [e for e in read_jsonl(tr.out / "events.jsonl") if e["event"] == "skipped_step"]
    assert ev == [{"step": 3, "event": "skipped_step", "reason": "non-finite loss", "micro_batch": 1}]


def test_consecutive_bad_steps_abort_with_a_clear_error(tiny_cfg, capsys):
    cfg = tiny_cfg("train.max_steps=8", "faults.nan_loss_steps=[2, 3, 4]", "train.max_bad_steps=3")
    with pytest.raises(TrainingError, match="3 consecutive steps with non-finite loss"):
        Trainer(cfg, quiet=True).train()
    args = ["train", "configs/tiny_text.yaml", *[o for o in tiny_overrides(cfg.run.output_dir, cfg.data.dir,
                                                                           cfg.tokenizer.model_path)],
            "train.max_steps=8", "faults.nan_loss_steps=[1, 2, 3]", "--quiet", f"run.output_dir={cfg.run.output_dir}2"]
    assert main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: training: 3 consecutive steps")


def test_spike_detector():
    d = SpikeDetector(window=20, zscore=4.0)
    rng = np.random.default_rng(0)
    assert all(d.observe(3.0 + 0.01 * rng.normal()) is None for _ in range(20))
    assert d.observe(3.5) > 4.0 and d.streak == 1
    assert d.observe(3.6) is not None and d.streak == 2  # spikes do not pollute the baseline
    assert d.observe(3.0) is None and d.streak == 0


def test_repeated_spike_rolls_back_and_skips_the_bad_data(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=16", "checkpoint.interval=2", "train.spike_window=10", "train.spike_zscore=5",
                   "train.spike_rollback_after=1", "faults.spike_loss_steps=[14]", "optim.lr=1e-3")
    tr = Trainer(cfg, quiet=True)
    tr.train()
    events = read_jsonl(tr.out / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert "loss_spike" in kinds and "rollback" in kinds, events
    rb = next(e for e in events if e["event"] == "rollback")
    assert rb["from_step"] == 14 and rb["checkpoint"].endswith("step_00000012") and rb["skipped_rows"] == 16
    assert tr.step == 16


def test_same_seed_gives_bit_identical_losses(tiny_cfg, tmp_path):
    runs = []
    for name in "ab":
        logged = Trainer(tiny_cfg("train.max_steps=5", f"run.output_dir={tmp_path / name}"), quiet=True).train()
        runs.append([m["loss"] for m in logged])
    assert runs[0] == runs[1]


def cli_train(run_dir, text_assets, *extra):
    _, tok, shards = text_assets
    cmd = [sys.executable, "-m", "ernie5", "train", "configs/tiny_text.yaml", *tiny_overrides(run_dir, shards, tok),
           "--quiet", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(run_dir, n, proc, timeout=120):
    path = run_dir / "metrics.jsonl"
    end = time.time() + timeout
    while time.time() < end:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("run made no progress")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, text_assets):
    run = tmp_path / "r"
    proc = cli_train(run, text_assets, "train.max_steps=500")
    wait_for_steps(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out
    step = int(out.split("at step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"step_{step:08d}" / "manifest.json").is_file()
    resumed = cli_train(run, text_assets, f"train.max_steps={step + 2}")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0 and f"step_{step:08d}" in err
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, step + 3))


def test_sigkill_at_random_points_never_loses_the_run(tmp_path, text_assets):
    """kill -9 mid-step and mid-save, several times; the final losses equal an uninterrupted run's."""
    steps, extra = 14, ["checkpoint.interval=2", "checkpoint.keep_last=2", "faults.slow_checkpoint_s=0.15"]
    ref = cli_train(tmp_path / "ref", text_assets, f"train.max_steps={steps}", *extra)
    assert ref.wait(timeout=300) == 0
    run = tmp_path / "killed"
    rng = np.random.default_rng(0)
    kills = 0
    while kills < 4:
        proc = cli_train(run, text_assets, f"train.max_steps={steps}", *extra)
        done = len(read_jsonl(run / "metrics.jsonl")) if (run / "metrics.jsonl").is_file() else 0
        if done >= steps - 1:
            proc.wait(timeout=300)
            break
        wait_for_steps(run, done + 1, proc)
        time.sleep(rng.uniform(0.0, 0.6))  # lands in steps and in the 0.15 s pauses between checkpoint files
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    final = cli_train(run, text_assets, f"train.max_steps={steps}", *extra)
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    assert kills >= 3
    want = [r["loss"] for r in read_jsonl(tmp_path / "ref" / "metrics.jsonl")]
    assert [r["loss"] for r in read_jsonl(run / "metrics.jsonl")] == want
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
