"""`ernie5 sweep` around the runner (stand-in trainer, no model built): one sweep at a time per output dir, and run
failures are reported even when the report cannot be written."""

import sys
from pathlib import Path

import pytest

from ernie5.errors import TrainingError, UserError
from ernie5.sweep.driver import run_sweep
from ernie5.sweep.runner import LOCK_FILE, sweep_lock
from tests.conftest import run_cli
from tests.sweep.helpers import write_base, write_sweep

FAKE = (sys.executable, str(Path(__file__).with_name("fake_train.py")))


def test_second_sweep_on_the_same_dir_is_refused(tmp_path):
    out = tmp_path / "out"
    with sweep_lock(out):
        assert (out / LOCK_FILE).is_file()
        with pytest.raises(UserError, match="another ernie5 sweep is running on this output dir"):
            with sweep_lock(out):
                pass
    with sweep_lock(out):  # released when the first sweep ends
        pass


def test_locked_dir_is_one_line_exit_2(tmp_path):
    write_base(tmp_path)
    sweep = write_sweep(tmp_path, "kind: sweep\nconfig: base.yaml\nvariants: {a: {}}\n")
    out = tmp_path / "out"
    with sweep_lock(out):
        r = run_cli("sweep", str(sweep), "--out", str(out), timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {out}: another ernie5 sweep is running on this output dir (it holds {out / LOCK_FILE}); wait for "
        "it to end or use another --out"]
    assert not (out / "a").exists()  # nothing was run


def test_run_failure_is_raised_even_when_the_report_fails(tmp_path, monkeypatch):
    """Variant `short` finishes (2 steps), `long` crashes at step 3; the stand-in writes no config.yaml, so the
    report raises a UserError: it is logged, and the run failure is what the sweep raises (exit 3, not 2)."""
    write_base(tmp_path)
    sweep = write_sweep(tmp_path, "kind: sweep\nconfig: base.yaml\nvariants:\n  short: {train.max_steps: 2}\n"
                                  "  long: {}\n")
    monkeypatch.setenv("FAKE_DIE_AT", "3")
    lines = []
    with pytest.raises(TrainingError, match=r"1 of 2 runs did not finish; first: long seed 0 \(failed"):
        run_sweep(str(sweep), out=str(tmp_path / "out"), log=lines.append, train_cmd=FAKE)
    assert any(ln.startswith("report not written: ") and "no config.yaml" in ln for ln in lines), lines
