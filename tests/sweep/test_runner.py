"""The runner's decisions, with a stand-in trainer (tests/sweep/fake_train.py) so no model is built: finished runs
are skipped, a crashed run does not stop the others and resumes from its checkpoint next time, run dirs made by
something else or with other arguments are refused, and --parallel pins each run to its share of the cores."""

import json
import os
import sys
from pathlib import Path

import pytest

from ernie5.errors import UserError
from ernie5.sweep.runner import MARKER, Runner, core_shares, reached_budget, read_marker, run_state
from ernie5.sweep.spec import Evaluation, RunSpec

FAKE = (sys.executable, str(Path(__file__).with_name("fake_train.py")))


def specs(root: Path, names=("a", "b"), steps: int = 4) -> list[RunSpec]:
    return [RunSpec(n, 1, "base.yaml", [f"train.max_steps={steps}"], str(root / n / "seed1"), steps) for n in names]


def starts(run: RunSpec) -> list[int]:
    return [int(x) for x in (Path(run.run_dir) / "starts.txt").read_text().split()]


def test_runs_then_skips_finished(tmp_path):
    runs = specs(tmp_path)
    lines = []
    out = Runner(runs, train_cmd=FAKE, log=lines.append).run()
    assert [o.status for o in out] == ["done", "done"]
    for r in runs:
        assert reached_budget(r.run_dir, 4) and read_marker(r.run_dir)["status"] == "done"
        assert "done: step 4" in (Path(r.run_dir) / "train.log").read_text()
    assert any(ln.startswith("[1/2] start a seed 1 (new)") for ln in lines)
    again = Runner(runs, train_cmd=FAKE, log=lines.append).run()
    assert [o.status for o in again] == ["skipped", "skipped"]
    assert starts(runs[0]) == [0] and starts(runs[1]) == [0]  # nothing was launched again


def test_crashed_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    runs = specs(tmp_path, ("a", "b", "c"))
    monkeypatch.setenv("FAKE_DIE_AT", "3")  # every run dies at the start of step 3 (after checkpoint 2)
    first = Runner(runs[:2], train_cmd=FAKE, log=lambda s: None).run()
    assert [o.status for o in first] == ["failed", "failed"]  # the first failure did not stop the second run
    assert "exit 3: error: training: injected crash at step 3" in first[0].message
    assert read_marker(runs[0].run_dir)["status"] == "failed"
    assert run_state(runs[0]) == "resume"
    monkeypatch.delenv("FAKE_DIE_AT")
    lines = []
    second = Runner(runs, train_cmd=FAKE, log=lines.append).run()
    assert [o.status for o in second] == ["done", "done", "done"]
    assert starts(runs[0]) == [0, 2] and starts(runs[2]) == [0]
    assert any("start a seed 1 (resume from step_00000002)" in ln for ln in lines)
    steps = [json.loads(ln)["step"] for ln in (Path(runs[0].run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    marker = read_marker(runs[0].run_dir)
    assert marker["attempts"] == 2 and marker["status"] == "done"


def test_done_marker_without_final_checkpoint_is_not_finished(tmp_path):
    run = specs(tmp_path, ("a",))[0]
    Runner([run], train_cmd=FAKE, log=lambda s: None).run()
    (Path(run.run_dir) / "checkpoints" / "step_00000004" / "manifest.json").unlink()
    assert run_state(run) == "resume"


def test_refuses_foreign_and_mismatched_run_dirs(tmp_path):
    run = specs(tmp_path, ("a",))[0]
    Path(run.run_dir).mkdir(parents=True)
    (Path(run.run_dir) / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match=f"has no {MARKER}"):
        Runner([run], train_cmd=FAKE, log=lambda s: None).run()
    run2 = specs(tmp_path / "x", ("a",))[0]
    Runner([run2], train_cmd=FAKE, log=lambda s: None).run()
    longer = RunSpec("a", 1, "base.yaml", ["train.max_steps=6"], run2.run_dir, 6)
    with pytest.raises(UserError, match="other arguments.*now with train.max_steps=6.*not with train.max_steps=4"):
        run_state(longer)


def test_same_sweep_from_another_cwd_or_absolute_paths_resumes(tmp_path, monkeypatch):
    """The same sweep expanded from another directory, or with absolute instead of relative paths, has the same
    run arguments (runs and their evaluations are recognised, not refused); a marker written with relative paths
    (before the sweep stored absolute ones) still reads from the directory it was written in."""
    from ernie5.sweep.spec import load_sweep
    from tests.sweep.helpers import write_base, write_sweep

    write_base(tmp_path)
    write_sweep(tmp_path, "kind: sweep\nconfig: base.yaml\nvariants: {a: {}}\n")
    (tmp_path / "sub").mkdir()

    def expand(sweep_path: str, out: str) -> RunSpec:
        r = load_sweep(sweep_path).expand([], out)[0]
        return RunSpec(r.variant, r.seed, r.config, r.overrides, r.run_dir, r.max_steps,
                       (Evaluation("elastic", 7),))  # fake_eval.py takes any batches

    monkeypatch.chdir(tmp_path)
    first = expand("s.yaml", "out")
    assert Runner([first], train_cmd=FAKE, eval_cmd=FAKE_EVAL, log=lambda s: None).run()[0].status == "done"
    assert run_state(expand(str(tmp_path / "s.yaml"), str(tmp_path / "out"))) == "done"
    monkeypatch.chdir(tmp_path / "sub")
    assert run_state(expand("../s.yaml", "../out")) == "done"
    assert run_state(expand(str(tmp_path / "s.yaml"), "../out")) == "done"
    with pytest.raises(UserError, match="other arguments.*now with .*other.yaml"):  # another file is still refused
        run_state(RunSpec("a", first.seed, str(tmp_path / "other.yaml"), first.overrides, first.run_dir,
                          first.max_steps))

    # an old marker: relative paths, read from the directory it was written in
    monkeypatch.chdir(tmp_path)
    old = RunSpec("b", 1, "base.yaml", ["train.max_steps=4"], "old/b/seed1", 4, (Evaluation("elastic", 7),))
    Runner([old], train_cmd=FAKE, eval_cmd=FAKE_EVAL, log=lambda s: None).run()
    assert read_marker(old.run_dir)["train_args"][0] == "base.yaml"
    assert run_state(RunSpec("b", 1, str(tmp_path / "base.yaml"), ["train.max_steps=4"],
                             str(tmp_path / "old/b/seed1"), 4, (Evaluation("elastic", 7),))) == "done"


def test_core_shares():
    assert core_shares(1) == [None]
    assert core_shares(2, [0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert core_shares(3, [4, 5, 6, 7]) == [[4], [5], [6, 7]]
    with pytest.raises(UserError, match="--parallel"):
        core_shares(3, [0, 1])


def test_parallel_runs_are_pinned(tmp_path):
    """Two at a time, each child sees its own core and OMP_NUM_THREADS=1 (the stand-in prints them)."""
    import os

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs 2 cores")
    probe = tmp_path / "probe.py"
    probe.write_text("import os, runpy, sys\nprint('affinity', sorted(os.sched_getaffinity(0)), "
                     "'omp', os.environ.get('OMP_NUM_THREADS'), flush=True)\n"
                     f"sys.argv = sys.argv[1:]\nrunpy.run_path({str(FAKE[1])!r}, run_name='__main__')\n")
    runs = specs(tmp_path, ("a", "b", "c"))
    out = Runner(runs, parallel=2, train_cmd=(sys.executable, str(probe), "x"), log=lambda s: None,
                 cores=cores[:2]).run()
    assert [o.status for o in out] == ["done"] * 3
    seen = {(Path(r.run_dir) / "train.log").read_text().split("affinity ")[1].split(" omp")[0] for r in runs}
    assert seen == {f"[{cores[0]}]", f"[{cores[1]}]"}  # each slot its own core, both slots used
    assert all("omp 1" in (Path(r.run_dir) / "train.log").read_text() for r in runs)


def test_ctrl_c_stops_the_children_and_marks_them_interrupted(tmp_path, monkeypatch):
    """A Ctrl-C (SIGINT to the sweep) sends each running child one SIGTERM, marks it interrupted and is raised
    again; the next invocation resumes it."""
    import os
    import signal
    import threading
    import time

    runs = specs(tmp_path, ("a", "b"), steps=50)
    monkeypatch.setenv("FAKE_STEP_S", "0.1")

    def interrupt():
        ckpt = Path(runs[0].run_dir) / "checkpoints" / "step_00000002" / "manifest.json"
        while not ckpt.is_file():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        Runner(runs, train_cmd=FAKE, log=lambda s: None).run()
    assert read_marker(runs[0].run_dir)["status"] == "interrupted"
    assert not Path(runs[1].run_dir).exists()  # never started
    monkeypatch.setenv("FAKE_STEP_S", "0")
    out = Runner(runs, train_cmd=FAKE, log=lambda s: None).run()
    assert [o.status for o in out] == ["done", "done"] and starts(runs[0])[0] == 0 and starts(runs[0])[1] >= 2


# ---- evaluations after training (stand-in evaluator: tests/sweep/fake_eval.py) ---------------------------
FAKE_EVAL = (sys.executable, str(Path(__file__).with_name("fake_eval.py")))


def evals(run: RunSpec) -> list[str]:
    path = Path(run.run_dir) / "evals.txt"
    return path.read_text().splitlines() if path.is_file() else []


def with_eval(runs: list[RunSpec], batches: int = 7) -> list[RunSpec]:
    return [RunSpec(r.variant, r.seed, r.config, r.overrides, r.run_dir, r.max_steps,
                    (Evaluation("elastic", batches),)) for r in runs]


def test_evaluation_runs_after_training(tmp_path):
    runs = with_eval(specs(tmp_path))
    lines = []
    out = Runner(runs, train_cmd=FAKE, eval_cmd=FAKE_EVAL, log=lines.append).run()
    assert [o.status for o in out] == ["done", "done"]
    a = [ln for ln in lines if "a seed 1" in ln]
    assert [ln.split()[1] for ln in a] == ["start", "trained", "evaluate", "evaluated", "done"]
    for r in runs:
        assert evals(r) == ["elastic 7"] and starts(r) == [0]
        marker = read_marker(r.run_dir)
        rec = marker["evaluations"]["elastic"]
        assert marker["status"] == "done" and marker["trained"] is True
        assert rec["status"] == "done" and rec["output"] == "eval/step_00000004/elastic_eval.json"
        assert rec["args"] == [str(Path(r.run_dir) / "checkpoints" / "step_00000004"), "--mode", "elastic",
                               "--batches", "7", "--out", str(Path(r.run_dir) / "eval" / "step_00000004")]
        assert "== elastic attempt 1:" in (Path(r.run_dir) / "eval.log").read_text()
        assert "elastic" not in (Path(r.run_dir) / "train.log").read_text()
    again = Runner(runs, train_cmd=FAKE, eval_cmd=FAKE_EVAL, log=lambda s: None).run()
    assert [o.status for o in again] == ["skipped", "skipped"] and evals(runs[0]) == ["elastic 7"]


def test_trained_run_gets_only_its_missing_evaluation(tmp_path):
    """A run trained without `evaluate:` (or whose evaluation is gone, stale or asked with other batches) gets
    its evaluation on the next invocation, not another training."""
    plain = specs(tmp_path, ("a",))
    Runner(plain, train_cmd=FAKE, eval_cmd=FAKE_EVAL, log=lambda s: None).run()
    run = with_eval(plain)[0]
    assert run_state(plain[0]) == "done" and run_state(run) == "evaluate"
    lines = []
    assert Runner([run], train_cmd=FAKE, eval_cmd=FAKE_EVAL, log=lines.append).run()[0].status == "done"
    assert not any(" start " in ln for ln in lines) and starts(run) == [0] and evals(run) == ["elastic 7"]
    assert run_state(run) == "done"

    output = Path(run.run_dir) / "eval" / "step_00000004" / "elastic_eval.json"
    output.unlink()  # the output is gone
    assert run_state(run) == "evaluate"
    Runner([run], train_cmd=FAKE, eval_cmd=FAKE_EVAL, log=lambda s: None).run()
    manifest = Path(run.run_dir) / "checkpoints" / "step_00000004" / "manifest.json"
    t = output.stat().st_mtime_ns
    os.utime(manifest, ns=(t + 1000, t + 1000))  # the checkpoint is newer than the evaluation
    assert run_state(run) == "evaluate"
    Runner([run], train_cmd=FAKE, eval_cmd=FAKE_EVAL, log=lambda s: None).run()
    assert run_state(run) == "done" and run_state(with_eval(plain, batches=9)[0]) == "evaluate"
    Runner(with_eval(plain, batches=9), train_cmd=FAKE, eval_cmd=FAKE_EVAL, log=lambda s: None).run()
    assert starts(run) == [0] and evals(run) == ["elastic 7"] * 3 + ["elastic 9"]


def test_failed_evaluation_fails_the_run(tmp_path, monkeypatch):
    runs = with_eval(specs(tmp_path))
    # the first run was trained by a sweep from before evaluations: its marker says done, without `trained`
    Runner(specs(tmp_path, ("a",)), train_cmd=FAKE, log=lambda s: None).run()
    marker = read_marker(runs[0].run_dir)
    del marker["trained"], marker["evaluations"]
    (Path(runs[0].run_dir) / MARKER).write_text(json.dumps(marker))
    assert run_state(runs[0]) == "evaluate"
    monkeypatch.setenv("FAKE_EVAL_FAIL", "1")
    out = Runner(runs, train_cmd=FAKE, eval_cmd=FAKE_EVAL, log=lambda s: None).run()
    assert [o.status for o in out] == ["failed", "failed"]  # the first failure did not stop the second run
    assert out[0].message.startswith("elastic evaluation exit 2: error: injected evaluation failure (see ")
    marker = read_marker(runs[0].run_dir)
    assert marker["status"] == "failed" and marker["trained"] is True
    assert marker["evaluations"]["elastic"]["status"] == "failed" and run_state(runs[0]) == "evaluate"
    monkeypatch.delenv("FAKE_EVAL_FAIL")
    again = Runner(runs, train_cmd=FAKE, eval_cmd=FAKE_EVAL, log=lambda s: None).run()
    assert [o.status for o in again] == ["done", "done"]
    assert starts(runs[0]) == [0] and evals(runs[0]) == ["elastic 7", "elastic 7"]
    assert read_marker(runs[0].run_dir)["evaluations"]["elastic"]["attempts"] == 2


def test_training_again_evaluates_again(tmp_path):
    """A lost final checkpoint means training resumes, and the new final checkpoint is evaluated anew."""
    run = with_eval(specs(tmp_path, ("a",)))[0]
    Runner([run], train_cmd=FAKE, eval_cmd=FAKE_EVAL, log=lambda s: None).run()
    import shutil

    shutil.rmtree(Path(run.run_dir) / "checkpoints" / "step_00000004")
    assert run_state(run) == "resume"
    assert Runner([run], train_cmd=FAKE, eval_cmd=FAKE_EVAL, log=lambda s: None).run()[0].status == "done"
    assert starts(run) == [0, 3] and evals(run) == ["elastic 7", "elastic 7"]


def test_ctrl_c_during_an_evaluation(tmp_path, monkeypatch):
    """A Ctrl-C while a run is being evaluated stops the evaluator and marks the run interrupted; the next
    invocation runs only the evaluation."""
    import signal
    import threading
    import time

    run = with_eval(specs(tmp_path, ("a",)))[0]
    monkeypatch.setenv("FAKE_EVAL_S", "30")

    def interrupt():
        while not evals(run):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        Runner([run], train_cmd=FAKE, eval_cmd=FAKE_EVAL, log=lambda s: None).run()
    assert time.perf_counter() - t0 < 20  # the evaluator was stopped, not waited for
    marker = read_marker(run.run_dir)
    assert marker["status"] == "interrupted" and marker["trained"] is True
    assert marker["evaluations"]["elastic"]["status"] == "interrupted" and run_state(run) == "evaluate"
    monkeypatch.setenv("FAKE_EVAL_S", "0")
    assert Runner([run], train_cmd=FAKE, eval_cmd=FAKE_EVAL, log=lambda s: None).run()[0].status == "done"
    assert starts(run) == [0] and len(evals(run)) == 2
