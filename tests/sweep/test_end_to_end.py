"""`ernie5 sweep` end to end with the real trainer: 2 variants x 1 seed of a 3-step tiny MoE on synthetic tokens,
then a re-run that skips both, then an interrupted run (its last checkpoint and log lines gone, as a kill after
checkpoint 2 leaves it) that the next `ernie5 sweep` resumes from its checkpoint."""

import json
import shutil
from pathlib import Path

from ernie5.sweep.runner import read_marker
from tests.conftest import run_cli
from tests.sweep.helpers import write_base, write_sweep


def test_sweep_runs_skips_and_resumes(tmp_path):
    write_base(tmp_path, ["checkpoint.interval=1", "checkpoint.keep_last=5"])
    sweep = write_sweep(tmp_path, """
kind: sweep
config: base.yaml
seeds: [5]
budget: {steps: 3}
variants:
  top2: {}
  top1: {model.moe.top_k: 1}
""")
    out = tmp_path / "out"
    env = {"OMP_NUM_THREADS": "1"}
    r = run_cli("sweep", str(sweep), "--out", str(out), timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[1/2] done top2 seed 5" in r.stdout and "[2/2] done top1 seed 5" in r.stdout
    report = (out / "report.md").read_text()
    assert "| top1 | 5 |" in report and "n/a: 1 seed" in report
    assert (out / "loss_curves.png").is_file() and (out / "heldout_curves.png").is_file()
    for v in ("top2", "top1"):
        assert read_marker(out / v / "seed5")["status"] == "done"

    r = run_cli("sweep", str(sweep), "--out", str(out), timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.count("skip ") == 2, r.stdout + r.stderr
    assert (out / "report.md").read_text() == report  # same runs, same report

    # interrupted after checkpoint 2: step 3's checkpoint and log lines are gone, the marker says running
    run = out / "top1" / "seed5"
    shutil.rmtree(run / "checkpoints" / "step_00000003")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= 2))
    marker = read_marker(run)
    marker["status"] = "running"
    (run / "sweep_run.json").write_text(json.dumps(marker))
    r = run_cli("sweep", str(sweep), "--out", str(out), timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skip top2 seed 5" in r.stdout and "start top1 seed 5 (resume from step_00000002)" in r.stdout
    assert "resumed from" in (run / "train.log").read_text()
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert read_marker(run)["status"] == "done" and read_marker(run)["attempts"] == 2
    assert Path(out / "report.md").is_file()
