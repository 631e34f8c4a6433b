"""The run directory's append-only logs that a resumed or rolled-back run must keep consistent:
events.jsonl (skips, spikes, rollbacks, signals), and the per-step metrics.jsonl / routing.jsonl."""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEP_LOGS = ("metrics.jsonl", "routing.jsonl")


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records past `last_step` (steps a resumed run will redo), atomically."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


class RunLog:
    """Writes only on the main rank (the others keep the same calls, so every rank runs the same code)."""

    def __init__(self, out: Path, is_main: bool):
        self.out, self.is_main = out, is_main

    def truncate(self, last_step: int) -> None:
        """Forget the per-step records after `last_step`: those steps are about to be redone."""
        if self.is_main:
            for name in STEP_LOGS:
                truncate_jsonl(self.out / name, last_step)

    def event(self, step: int, kind: str, warn: bool = True, **fields) -> None:
        """Append an event; unless `warn` is False (or it is a resume), also print a warning line."""
        if not self.is_main:
            return
        with open(self.out / "events.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "event": kind, **fields}) + "\n")
        if kind != "resumed" and warn:
            detail = ", ".join(f"{k}={v}" for k, v in fields.items())
            print(f"warning: step {step}: {kind}" + (f" ({detail})" if detail else ""), file=sys.stderr)
