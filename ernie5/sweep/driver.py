"""`ernie5 sweep`: load the sweep file, validate every run's config, run them, then write the comparison report.

OUT/sweep.json records what `ernie5 compare OUT` needs to redo the report: the sweep's name, its variants, the
run directories in order (relative to OUT), the ladder settings and the evaluations. The whole sweep holds
OUT/.sweep.lock (`runner.sweep_lock`): a second `ernie5 sweep` on the same OUT is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ernie5.errors import TrainingError, UserError
from ernie5.sweep.report import SWEEP_FILE, compare
from ernie5.sweep.runner import EVAL_CMD, TRAIN_CMD, Outcome, Runner, run_state, sweep_lock
from ernie5.sweep.spec import load_sweep


@dataclass
class SweepResult:
    outcomes: list[Outcome]
    report: Optional[Path]
    out: Path


def run_sweep(path: str, out: Optional[str] = None, overrides: list[str] = (), parallel: int = 1,
              log: Callable[[str], None] = print, train_cmd=TRAIN_CMD, eval_cmd=EVAL_CMD) -> SweepResult:
    """Validate, run (skipping finished runs, resuming interrupted ones; then each run's evaluations), report. A
    failed run does not stop the others; the report covers the finished runs and a TrainingError names the
    failures afterwards. One sweep at a time per output dir (`sweep_lock`)."""
    sweep = load_sweep(path)
    runs = sweep.expand(list(overrides), out)
    out_dir = Path(out or sweep.out)
    with sweep_lock(out_dir):
        return _run_locked(sweep, runs, out_dir, overrides, parallel, log, train_cmd, eval_cmd)


def _run_locked(sweep, runs, out_dir: Path, overrides, parallel, log, train_cmd, eval_cmd) -> SweepResult:
    for r in runs:  # refuse foreign or mismatched run dirs before writing anything
        run_state(r)
    log(f"sweep {sweep.name}: {len(sweep.variants)} variant(s) x {len(sweep.seeds)} seed(s) = {len(runs)} run(s), "
        f"{runs[0].max_steps} steps each" if len({r.max_steps for r in runs}) == 1 else
        f"sweep {sweep.name}: {len(runs)} run(s), {min(r.max_steps for r in runs)}-"
        f"{max(r.max_steps for r in runs)} steps")
    if sweep.evaluate:
        log("then each run: " + ", ".join(f"eval --mode {ev.mode} --batches {ev.batches}" for ev in sweep.evaluate))
    out_dir.mkdir(parents=True, exist_ok=True)
    # run dirs relative to OUT, so that `ernie5 compare OUT` works from any directory
    record = {**sweep.as_dict(), "overrides": list(overrides),
              "runs": [os.path.relpath(r.run_dir, out_dir) for r in runs]}
    (out_dir / SWEEP_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    outcomes = Runner(runs, parallel=parallel, train_cmd=train_cmd, log=log, eval_cmd=eval_cmd).run()
    finished = [o for o in outcomes if o.status in ("done", "skipped")]
    bad = [o for o in outcomes if o.status not in ("done", "skipped")]
    report = None
    if finished:
        try:
            report = compare([str(out_dir)], out_dir)
            log(f"report: {report}")
        except UserError as e:
            if not bad:
                raise
            log(f"report not written: {e}")  # the run failures below are what the sweep reports
    if bad:
        first = bad[0]
        raise TrainingError(f"{len(bad)} of {len(outcomes)} runs did not finish; first: {first.spec.label} "
                            f"({first.status}: {first.message})")
    return SweepResult(outcomes, report, out_dir)
