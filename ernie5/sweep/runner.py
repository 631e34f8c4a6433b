"""Running a sweep's runs: each one is `python -m ernie5 train CONFIG OVERRIDES...` in its own subprocess.

Why a subprocess per run, also when running one at a time: it is exactly the code path of `ernie5 train` (the
same argument parsing, process setup and exit codes); a run that crashes, runs out of memory or stops on a
TrainingError fails alone and the sweep goes on with the next one; every run starts with fresh process state
(paddle's global generator and parameter-name counters, signal handlers); and resuming needs nothing from the
sweep but the same command again, since the trainer resumes from the newest checkpoint in its output dir.
Each child gets its own session, so a Ctrl-C reaches only the sweep, which sends each running child one SIGTERM:
the trainer checkpoints and exits, and the next `ernie5 sweep` resumes it.

A run directory holds `sweep_run.json`, written by the sweep: the run's variant, seed, `ernie5 train` arguments,
step budget, status (`running`, `done`, `failed`, `interrupted`), `trained`, attempts, wall time and, for a sweep
with `evaluate:`, one record per evaluation under `evaluations`. Training is finished when that file says
`trained` (written only after the child exited 0 and both of these were checked), its arguments are the ones the
sweep asks for now, `metrics.jsonl` logged step `max_steps` (the trainer always logs the last step) and the
checkpoint `checkpoints/step_<max_steps>` exists (the trainer always saves the last step). A directory made with
other arguments is refused rather than silently mixed.

Evaluations (`evaluate:` in the sweep file) run after training, in the same slot, each as
`python -m ernie5 eval RUN/checkpoints/step_<max_steps> --mode M --batches N --out RUN/eval/step_<max_steps>`
with its output appended to RUN/eval.log. An evaluation is done when its record in `sweep_run.json` says `done`
with the eval arguments asked for now, and its output file (`RUN/eval/step_<max_steps>/<mode>_eval.json`) exists
and is not older than the final checkpoint's manifest. Starting training again clears the records (a new final
checkpoint needs new evaluations). A run is finished (`status: done`, skipped next time) only when its training
and every evaluation are; a failed evaluation marks the run failed, and the next `ernie5 sweep` runs only the
evaluations that are not done, not the training.

The paths in the stored arguments (the config file, `run.output_dir`, the evaluation's checkpoint and `--out`)
are compared after resolving them, so the same sweep run again from another directory, or with an absolute instead
of a relative path, is recognised; a marker from before the sweep stored absolute paths is resolved against the
current directory. One sweep at a time per output dir: `sweep_lock` holds an exclusive flock on OUT/.sweep.lock.

`--parallel N` runs N at a time, each pinned (sched_setaffinity in the child before exec) to its own 1/N of the
cores this process may use, with OMP_NUM_THREADS set to that share.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Optional

from ernie5.errors import UserError
from ernie5.sweep.spec import Evaluation, RunSpec
from ernie5.train.checkpoint import MANIFEST, list_checkpoints, step_dir_name

MARKER = "sweep_run.json"
LOCK_FILE = ".sweep.lock"
TRAIN_LOG = "train.log"
EVAL_LOG = "eval.log"
TRAIN_CMD = (sys.executable, "-m", "ernie5", "train")
EVAL_CMD = (sys.executable, "-m", "ernie5", "eval")


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
    # not analysis.routing.read_metrics: that refuses a corrupt line before the last, which here would stop the whole
    # sweep (or a run's bookkeeping) over one run's log; a run whose log is damaged just does not look finished
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
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    return found[-1].name if found else None


def final_manifest(run_dir, max_steps: int) -> Path:
    return Path(run_dir) / "checkpoints" / step_dir_name(max_steps) / MANIFEST


def _resolved(path: str) -> str:
    return str(Path(path).resolve())


def same_train_args(old, new: list[str]) -> bool:
    """`ernie5 train` arguments equal once the config path and run.output_dir are resolved."""
    return isinstance(old, list) and _norm_train(old) == _norm_train(new)


def _norm_train(args: list) -> list:
    out = [_resolved(a) if i == 0 and isinstance(a, str) else a for i, a in enumerate(args)]
    for i, a in enumerate(out):
        if isinstance(a, str) and a.startswith("run.output_dir="):
            out[i] = "run.output_dir=" + _resolved(a.partition("=")[2])
    return out


def same_eval_args(old, new: list[str]) -> bool:
    """`ernie5 eval` arguments equal once the checkpoint path and the `--out` dir are resolved."""
    def norm(args: list) -> list:
        return [_resolved(a) if isinstance(a, str) and (i == 0 or args[i - 1] == "--out") else a
                for i, a in enumerate(args)]
    return isinstance(old, list) and norm(old) == norm(new)


def reached_budget(run_dir, max_steps: int) -> bool:
    """metrics.jsonl logged step `max_steps` and its checkpoint is complete."""
    return last_logged_step(run_dir) == max_steps and final_manifest(run_dir, max_steps).is_file()


def is_trained(spec: RunSpec, marker: dict) -> bool:
    """Training finished (see the module docstring). A marker from before `trained` existed says `done`."""
    return bool(marker.get("trained", marker.get("status") == "done")) and reached_budget(spec.run_dir,
                                                                                          spec.max_steps)


def evaluation_done(spec: RunSpec, ev: Evaluation, marker: dict) -> bool:
    """The marker records `ev` done with today's arguments and its output is not older than the final checkpoint."""
    rec = (marker.get("evaluations") or {}).get(ev.mode) or {}
    if rec.get("status") != "done" or not same_eval_args(rec.get("args"), spec.eval_args(ev)):
        return False
    out, manifest = ev.output(spec.run_dir, spec.max_steps), final_manifest(spec.run_dir, spec.max_steps)
    return out.is_file() and manifest.is_file() and out.stat().st_mtime_ns >= manifest.stat().st_mtime_ns


def pending_evaluations(spec: RunSpec, marker: dict) -> list[Evaluation]:
    return [ev for ev in spec.evaluate if not evaluation_done(spec, ev, marker)]


def run_state(spec: RunSpec) -> str:
    """`done` (finished, skip it), `evaluate` (trained; evaluations to run), `resume` (checkpoints to resume from)
    or `new`; UserError for a run dir this sweep did not make or made with other arguments."""
    run_dir = Path(spec.run_dir)
    marker = read_marker(run_dir)
    if marker is None:
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise UserError(str(run_dir), f"exists but has no {MARKER} (not made by ernie5 sweep); use another "
                                          "--out or move it away")
        return "new"
    if not same_train_args(marker.get("train_args"), spec.train_args()):
        stored = marker.get("train_args")
        old, new = _norm_train(stored if isinstance(stored, list) else []), _norm_train(spec.train_args())
        diff = "; ".join([f"now with {a}" for a in new if a not in old] + [f"not with {a}" for a in old
                                                                            if a not in new]) or "another order"
        raise UserError(str(run_dir), f"was run with other arguments ({diff}); use another --out, or remove the "
                                      "run dir to run it again")
    if is_trained(spec, marker):
        done = marker.get("status") == "done" and not pending_evaluations(spec, marker)
        return "done" if done else "evaluate"
    return "resume" if newest_checkpoint(run_dir) else "new"


@contextmanager
def sweep_lock(out_dir):
    """Hold an exclusive lock on OUT/.sweep.lock (made with OUT) for the block: a second sweep on the same output
    dir would train into the same run dirs, so it is refused (UserError) instead of waiting. The kernel drops the
    lock when this process ends, however it ends; children do not inherit it (Popen closes other fds)."""
    out_dir = Path(out_dir)
    path = out_dir / LOCK_FILE
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a", encoding="utf-8")
    except OSError as e:
        raise UserError(str(path), f"cannot create the sweep's lock file ({e.strerror or e})") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise UserError(str(out_dir), f"another ernie5 sweep is running on this output dir (it holds {path}); wait "
                                      "for it to end or use another --out") from None
    try:
        yield path
    finally:
        fh.close()  # releases the lock


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


@dataclass
class _Child:
    """A running child process: run `index`'s training (evaluation None) or one of its evaluations."""

    index: int
    proc: subprocess.Popen
    t0: float
    log: IO
    evaluation: Optional[Evaluation]
    cores: Optional[list[int]]


class Runner:
    """Runs RunSpecs in order, `parallel` at a time: each run's training, then its evaluations, in one slot.
    `train_cmd` / `eval_cmd` are the commands before the train / eval arguments (tests swap in stand-ins); `log`
    receives the progress lines."""

    def __init__(self, runs: list[RunSpec], parallel: int = 1, train_cmd=TRAIN_CMD,
                 log: Callable[[str], None] = print, cores: Optional[list[int]] = None, eval_cmd=EVAL_CMD):
        self.runs = runs
        self.slots = core_shares(parallel, cores)
        self.train_cmd = list(train_cmd)
        self.eval_cmd = list(eval_cmd)
        self.log = log
        self.t0 = time.perf_counter()
        self.wall: dict[int, float] = {}  # run index -> this invocation's wall time over its children
        self.evaluated: dict[int, set[str]] = {}  # run index -> modes evaluated in this invocation

    def run(self) -> list[Outcome]:
        """Run every unfinished run; returns one Outcome per run, in the runs' order. A Ctrl-C stops the running
        children (a trainer checkpoints), marks them interrupted and is raised again."""
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
        active: dict[int, _Child] = {}
        stop = False
        # SIGTERM and SIGINT both stop the sweep as Ctrl-C does, also when it was started with SIGINT ignored
        # (a background job inherits SIG_IGN, and Python then never raises KeyboardInterrupt)
        previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while pending or active:
                for slot in range(len(self.slots)):
                    while slot not in active and pending and not stop:
                        i, state = pending.popleft()
                        nxt = self._next(i, state, self.slots[slot])
                        if isinstance(nxt, Outcome):  # nothing left to launch
                            outcomes[i] = nxt
                        else:
                            active[slot] = nxt
                time.sleep(0.1)
                for slot, child in list(active.items()):
                    if child.proc.poll() is None:
                        continue
                    del active[slot]
                    child.log.close()
                    outcome = self._end(child, child.proc.returncode)
                    if outcome is None:  # that step succeeded: the run's next one in the same slot
                        outcome = self._next(child.index, "evaluate", child.cores)
                    if isinstance(outcome, Outcome):
                        outcomes[child.index] = outcome
                        stop = stop or outcome.status == "interrupted"
                    else:
                        active[slot] = outcome
                if stop and not active:
                    break
        except KeyboardInterrupt:
            for child in active.values():
                if child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)  # the trainer saves a checkpoint and exits
            for child in active.values():
                child.proc.wait()
                child.log.close()
                if self._end(child, child.proc.returncode, interrupted=True) is None:  # that step had finished
                    spec = self.runs[child.index]
                    marker = read_marker(spec.run_dir) or {}
                    if pending_evaluations(spec, marker):
                        marker["status"] = "interrupted"
                        write_marker(spec.run_dir, marker)
                    else:
                        self._next(child.index, "evaluate", None)  # marks it done
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        for i, state in pending:  # not started: an earlier run was interrupted
            outcomes[i] = Outcome(self.runs[i], "interrupted", message="not started")
        return [outcomes[i] for i in range(n)]

    # ---- one run's steps ---------------------------------------------------------------------------------
    def _next(self, i: int, state: str, cores: Optional[list[int]]):
        """Start run i's next step (training unless `state` is `evaluate`, else its first pending evaluation); an
        Outcome `done` when none is left."""
        spec = self.runs[i]
        if state in ("new", "resume"):
            return self._start_train(i, state, cores)
        marker = read_marker(spec.run_dir) or {}
        # an evaluation that succeeded in this invocation is not run again (its output could still look older
        # than a checkpoint whose mtime is in the future)
        todo = [ev for ev in pending_evaluations(spec, marker) if ev.mode not in self.evaluated.get(i, ())]
        if todo:
            return self._start_eval(i, todo[0], marker, cores)
        marker["status"] = "done"
        write_marker(spec.run_dir, marker)
        wall = self.wall.get(i, 0.0)
        evals = f" + {len(spec.evaluate)} evaluation(s)" if spec.evaluate else ""
        self.log(f"[{i + 1}/{len(self.runs)}] done {spec.label}{evals} in {_fmt_s(wall)} "
                 f"(sweep {_fmt_s(time.perf_counter() - self.t0)})")
        return Outcome(spec, "done", wall, 0)

    def _popen(self, cmd: list[str], log_path: Path, header: str, cores: Optional[list[int]]):
        env = dict(os.environ)
        if cores is not None:
            env["OMP_NUM_THREADS"] = str(len(cores))
        preexec = None if cores is None else (lambda: os.sched_setaffinity(0, cores))
        fh = open(log_path, "a", encoding="utf-8")
        fh.write(header + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=preexec, start_new_session=True)
        return proc, fh

    def _start_train(self, i: int, state: str, cores: Optional[list[int]]) -> _Child:
        spec = self.runs[i]
        run_dir = Path(spec.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        marker = read_marker(run_dir) or {}
        attempts = int(marker.get("attempts", 0)) + 1
        # a new training invalidates earlier evaluations (they were of another final checkpoint)
        write_marker(run_dir, {"variant": spec.variant, "seed": spec.seed, "train_args": spec.train_args(),
                               "max_steps": spec.max_steps, "status": "running", "trained": False,
                               "attempts": attempts, "wall_s": float(marker.get("wall_s", 0.0)),
                               "evaluations": {}})
        cmd = self.train_cmd + spec.train_args()
        proc, fh = self._popen(cmd, run_dir / TRAIN_LOG, f"== attempt {attempts}: "
                                                         f"{' '.join(cmd[len(self.train_cmd) - 1:])}", cores)
        how = f"resume from {newest_checkpoint(run_dir)}" if state == "resume" else "new"
        pin = f", cores {','.join(map(str, cores))}" if cores is not None else ""
        self.log(f"[{i + 1}/{len(self.runs)}] start {spec.label} ({how}{pin}) -> {spec.run_dir}")
        return _Child(i, proc, time.perf_counter(), fh, None, cores)

    def _start_eval(self, i: int, ev: Evaluation, marker: dict, cores: Optional[list[int]]) -> _Child:
        spec = self.runs[i]
        records = marker.setdefault("evaluations", {})
        attempts = int((records.get(ev.mode) or {}).get("attempts", 0)) + 1
        records[ev.mode] = {"args": spec.eval_args(ev), "status": "running", "attempts": attempts,
                            "output": str(ev.output(spec.run_dir, spec.max_steps).relative_to(spec.run_dir))}
        marker["status"] = "running"
        marker["trained"] = True  # explicit from here on (a marker from before the key existed said `done`)
        write_marker(spec.run_dir, marker)
        cmd = self.eval_cmd + spec.eval_args(ev)
        proc, fh = self._popen(cmd, Path(spec.run_dir) / EVAL_LOG,
                               f"== {ev.mode} attempt {attempts}: {' '.join(cmd[len(self.eval_cmd) - 1:])}", cores)
        pin = f", cores {','.join(map(str, cores))}" if cores is not None else ""
        self.log(f"[{i + 1}/{len(self.runs)}] evaluate {spec.label} ({ev.mode}, {ev.batches} batches{pin}) -> "
                 f"{Path(spec.run_dir) / EVAL_LOG}")
        return _Child(i, proc, time.perf_counter(), fh, ev, cores)

    def _end(self, child: _Child, rc: int, interrupted: bool = False) -> Optional[Outcome]:
        """Record a child's end in the marker: None when it succeeded, else the run's Outcome."""
        wall = time.perf_counter() - child.t0
        self.wall[child.index] = self.wall.get(child.index, 0.0) + wall
        if child.evaluation is None:
            return self._end_train(child.index, rc, wall, interrupted)
        return self._end_eval(child.index, child.evaluation, rc, wall, interrupted)

    def _end_train(self, i: int, rc: int, wall: float, interrupted: bool) -> Optional[Outcome]:
        spec = self.runs[i]
        marker = read_marker(spec.run_dir) or {}
        marker["wall_s"] = round(float(marker.get("wall_s", 0.0)) + wall, 3)
        marker["returncode"] = rc
        if rc == 0 and reached_budget(spec.run_dir, spec.max_steps):
            marker["trained"] = True
            write_marker(spec.run_dir, marker)
            if spec.evaluate:
                self.log(f"[{i + 1}/{len(self.runs)}] trained {spec.label} in {_fmt_s(wall)}")
            return None
        if rc == 0 or interrupted or rc in (130, -signal.SIGTERM, -signal.SIGINT):
            status = "interrupted"
            msg = f"stopped at step {last_logged_step(spec.run_dir)}; run `ernie5 sweep` again to resume"
        else:
            status = "failed"
            msg = f"exit {rc}: {_last_line(Path(spec.run_dir) / TRAIN_LOG)}"
        return self._stopped(i, marker, status, msg, rc)

    def _end_eval(self, i: int, ev: Evaluation, rc: int, wall: float, interrupted: bool) -> Optional[Outcome]:
        spec = self.runs[i]
        marker = read_marker(spec.run_dir) or {}
        rec = marker.setdefault("evaluations", {}).setdefault(ev.mode, {})
        rec["wall_s"] = round(float(rec.get("wall_s", 0.0)) + wall, 3)
        rec["returncode"] = rc
        out = ev.output(spec.run_dir, spec.max_steps)
        if rc == 0 and out.is_file():
            rec["status"] = "done"
            write_marker(spec.run_dir, marker)
            self.evaluated.setdefault(i, set()).add(ev.mode)
            self.log(f"[{i + 1}/{len(self.runs)}] evaluated {spec.label} ({ev.mode}) in {_fmt_s(wall)}")
            return None
        if interrupted or rc in (130, -signal.SIGTERM, -signal.SIGINT):
            status, msg = "interrupted", f"{ev.mode} evaluation stopped; run `ernie5 sweep` again to evaluate"
        elif rc == 0:
            status, msg = "failed", f"{ev.mode} evaluation exited 0 but wrote no {out}"
        else:
            status = "failed"
            msg = f"{ev.mode} evaluation exit {rc}: {_last_line(Path(spec.run_dir) / EVAL_LOG)}"
        rec["status"] = status
        return self._stopped(i, marker, status, msg, rc)

    def _stopped(self, i: int, marker: dict, status: str, msg: str, rc: int) -> Outcome:
        spec = self.runs[i]
        marker["status"] = status
        write_marker(spec.run_dir, marker)
        wall = self.wall.get(i, 0.0)
        what = {"failed": "FAILED", "interrupted": "interrupted"}[status]
        self.log(f"[{i + 1}/{len(self.runs)}] {what} {spec.label} in {_fmt_s(wall)} "
                 f"(sweep {_fmt_s(time.perf_counter() - self.t0)}): {msg}")
        return Outcome(spec, status, wall, rc, msg)


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    return (lines[-1][:200] if lines else "no output") + f" (see {log})"
