"""Running a sweep's runs: each one is `python -m ernie5 train CONFIG OVERRIDES...` in its own subprocess.

Why a subprocess per run, also when running one at a time: it is exactly the code path of `ernie5 train` (the
same argument parsing, process setup and exit codes); a run that crashes, runs out of memory or stops on a
TrainingError fails alone and the sweep goes on with the next one; every run starts with fresh process state
(paddle's global generator and parameter-name counters, signal handlers); and resuming needs nothing from the
sweep but the same command again, since the trainer resumes from the newest checkpoint in its output dir.
Each child gets its own session, so a Ctrl-C reaches only the sweep, which sends each running child one SIGTERM:
the trainer checkpoints and exits, and the next `ernie5 sweep` resumes it.

A run directory holds `sweep_run.json`, written by the sweep: the run's variant, seed, `ernie5 train` arguments,
step budget, status (`running`, `done`, `failed`, `interrupted`), attempts and wall time. A run counts as
finished when that file says `done`, its arguments are the ones the sweep asks for now, `metrics.jsonl` logged
step `max_steps` (the trainer always logs the last step) and the checkpoint `checkpoints/step_<max_steps>`
exists (the trainer always saves the last step). The sweep writes `done` only after the child exited 0 and both
were checked. A directory made with other arguments is refused rather than silently mixed.

`--parallel N` runs N at a time, each pinned (sched_setaffinity in the child before exec) to its own 1/N of the
cores this process may use, with OMP_NUM_THREADS set to that share.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ernie5.errors import UserError
from ernie5.sweep.spec import RunSpec

MARKER = "sweep_run.json"
TRAIN_LOG = "train.log"
TRAIN_CMD = (sys.executable, "-m", "ernie5", "train")


@dataclass
class Outcome:
    """What happened to one run in this invocation: skipped (already finished), done, failed or interrupted."""

    spec: RunSpec
    status: str
    wall_s: float = 0.0  # this invocation's
    returncode: Optional[int] = None
    message: str = ""


# ---- the run directory's state ----------------------------------------------------------------------------
def read_marker(run_dir) -> Optional[dict]:
    path = Path(run_dir) / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(str(path), f"unreadable ({e}); remove the run dir to run it again") from None


def write_marker(run_dir, record: dict) -> None:
    path = Path(run_dir) / MARKER
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def last_logged_step(run_dir) -> Optional[int]:
    """The step of the last complete line of metrics.jsonl (None: nothing logged)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    step = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a half-written last line
    return step


def newest_checkpoint(run_dir) -> Optional[str]:
    root = Path(run_dir) / "checkpoints"
    names = sorted(p.name for p in root.glob("step_*") if (p / "manifest.json").is_file()) if root.is_dir() else []
    return names[-1] if names else None


def reached_budget(run_dir, max_steps: int) -> bool:
    """metrics.jsonl logged step `max_steps` and its checkpoint is complete."""
    final = Path(run_dir) / "checkpoints" / f"step_{max_steps:08d}" / "manifest.json"
    return last_logged_step(run_dir) == max_steps and final.is_file()


def run_state(spec: RunSpec) -> str:
    """`done` (finished, skip it), `resume` (checkpoints to resume from) or `new`; UserError for a run dir this
    sweep did not make or made with other arguments."""
    run_dir = Path(spec.run_dir)
    marker = read_marker(run_dir)
    if marker is None:
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise UserError(str(run_dir), f"exists but has no {MARKER} (not made by ernie5 sweep); use another "
                                          "--out or move it away")
        return "new"
    if marker.get("train_args") != spec.train_args():
        old, new = marker.get("train_args") or [], spec.train_args()
        diff = "; ".join([f"now with {a}" for a in new if a not in old] + [f"not with {a}" for a in old
                                                                            if a not in new]) or "another order"
        raise UserError(str(run_dir), f"was run with other arguments ({diff}); use another --out, or remove the "
                                      "run dir to run it again")
    if marker.get("status") == "done" and reached_budget(run_dir, spec.max_steps):
        return "done"
    return "resume" if newest_checkpoint(run_dir) else "new"


# ---- running ----------------------------------------------------------------------------------------------
def core_shares(parallel: int, cores: Optional[list[int]] = None) -> list[Optional[list[int]]]:
    """The CPU set of each of `parallel` slots ([None]: one slot, not pinned)."""
    if parallel == 1:
        return [None]
    cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
    if parallel > len(cores):
        raise UserError("--parallel", f"{parallel} runs at a time need at least {parallel} cores; this process may "
                                      f"use {len(cores)}")
    return [cores[i * len(cores) // parallel:(i + 1) * len(cores) // parallel] for i in range(parallel)]


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _fmt_s(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


class Runner:
    """Runs RunSpecs in order, `parallel` at a time; `train_cmd` is the command before the train arguments
    (tests swap in a stand-in trainer); `log` receives the progress lines."""

    def __init__(self, runs: list[RunSpec], parallel: int = 1, train_cmd=TRAIN_CMD,
                 log: Callable[[str], None] = print, cores: Optional[list[int]] = None):
        self.runs = runs
        self.slots = core_shares(parallel, cores)
        self.train_cmd = list(train_cmd)
        self.log = log
        self.t0 = time.perf_counter()

    def run(self) -> list[Outcome]:
        """Run every unfinished run; returns one Outcome per run, in the runs' order. A Ctrl-C stops the running
        children (they checkpoint), marks them interrupted and is raised again."""
        states = [run_state(r) for r in self.runs]  # every refusal before anything starts
        n = len(self.runs)
        outcomes: dict[int, Outcome] = {}
        pending = deque()
        for i, (spec, state) in enumerate(zip(self.runs, states)):
            if state == "done":
                outcomes[i] = Outcome(spec, "skipped", message="finished earlier")
                self.log(f"[{i + 1}/{n}] skip {spec.label}: finished ({spec.run_dir})")
            else:
                pending.append((i, state))
        active: dict[int, tuple] = {}  # slot -> (index, Popen, start time, log file)
        stop = False
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # a SIGTERM to the sweep stops it like Ctrl-C
        try:
            while pending or active:
                for slot in range(len(self.slots)):
                    if slot not in active and pending and not stop:
                        i, state = pending.popleft()
                        active[slot] = self._start(i, state, self.slots[slot])
                time.sleep(0.1)
                for slot, (i, proc, t0, fh) in list(active.items()):
                    if proc.poll() is None:
                        continue
                    del active[slot]
                    fh.close()
                    outcomes[i] = self._finish(i, proc.returncode, time.perf_counter() - t0)
                    stop = stop or outcomes[i].status == "interrupted"
                if stop and not active:
                    break
        except KeyboardInterrupt:
            for slot, (i, proc, t0, fh) in active.items():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)  # the trainer saves a checkpoint and exits
            for slot, (i, proc, t0, fh) in active.items():
                proc.wait()
                fh.close()
                self._finish(i, proc.returncode, time.perf_counter() - t0, interrupted=True)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        for i, state in pending:  # not started: an earlier run was interrupted
            outcomes[i] = Outcome(self.runs[i], "interrupted", message="not started")
        return [outcomes[i] for i in range(n)]

    def _start(self, i: int, state: str, cores: Optional[list[int]]):
        spec = self.runs[i]
        run_dir = Path(spec.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        marker = read_marker(run_dir) or {}
        attempts = int(marker.get("attempts", 0)) + 1
        write_marker(run_dir, {"variant": spec.variant, "seed": spec.seed, "train_args": spec.train_args(),
                               "max_steps": spec.max_steps, "status": "running", "attempts": attempts,
                               "wall_s": float(marker.get("wall_s", 0.0))})
        env = dict(os.environ)
        preexec = None
        if cores is not None:
            env["OMP_NUM_THREADS"] = str(len(cores))

            def preexec():
                os.sched_setaffinity(0, cores)
        cmd = self.train_cmd + spec.train_args()
        fh = open(run_dir / TRAIN_LOG, "a", encoding="utf-8")
        fh.write(f"== attempt {attempts}: {' '.join(cmd[len(self.train_cmd) - 1:])}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=preexec, start_new_session=True)
        how = f"resume from {newest_checkpoint(run_dir)}" if state == "resume" else "new"
        pin = f", cores {','.join(map(str, cores))}" if cores is not None else ""
        self.log(f"[{i + 1}/{len(self.runs)}] start {spec.label} ({how}{pin}) -> {spec.run_dir}")
        return i, proc, time.perf_counter(), fh

    def _finish(self, i: int, rc: int, wall: float, interrupted: bool = False) -> Outcome:
        spec = self.runs[i]
        marker = read_marker(spec.run_dir) or {}
        marker["wall_s"] = round(float(marker.get("wall_s", 0.0)) + wall, 3)
        marker["returncode"] = rc
        finished = rc == 0 and reached_budget(spec.run_dir, spec.max_steps)
        if finished:
            status, msg = "done", ""
        elif rc == 0 or interrupted or rc in (130, -signal.SIGTERM, -signal.SIGINT):
            status = "interrupted"
            msg = f"stopped at step {last_logged_step(spec.run_dir)}; run `ernie5 sweep` again to resume"
        else:
            status = "failed"
            msg = f"exit {rc}: {self._last_line(spec)}"
        marker["status"] = status
        write_marker(spec.run_dir, marker)
        total = _fmt_s(time.perf_counter() - self.t0)
        what = {"done": "done", "failed": "FAILED", "interrupted": "interrupted"}[status]
        self.log(f"[{i + 1}/{len(self.runs)}] {what} {spec.label} in {_fmt_s(wall)} (sweep {total})"
                 + (f": {msg}" if msg else ""))
        return Outcome(spec, status, wall, rc, msg)

    @staticmethod
    def _last_line(spec: RunSpec) -> str:
        lines = [ln for ln in (Path(spec.run_dir) / TRAIN_LOG).read_text(errors="replace").splitlines()
                 if ln.strip()]
        return (lines[-1][:200] if lines else "no output") + f" (see {Path(spec.run_dir) / TRAIN_LOG})"
