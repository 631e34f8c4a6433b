"""A stand-in for `ernie5 train CONFIG key=value...` that the runner tests launch instead of the real trainer.

It keeps the trainer's run-directory contract: resumes from the newest `checkpoints/step_XXXXXXXX/manifest.json`,
logs one metrics.jsonl record per step (dropping records past the checkpoint it resumed from), checkpoints every
step and exits 0 at `train.max_steps`. FAKE_DIE_AT=N makes it exit 3 at the start of step N (a crash);
FAKE_STEP_S makes each step take that long.
Each invocation appends the step it started from to `starts.txt`.
"""

import json
import os
import sys
import time
from pathlib import Path

overrides = dict(a.split("=", 1) for a in sys.argv[2:])
out = Path(overrides["run.output_dir"])
max_steps = int(overrides.get("train.max_steps", 3))
die_at = int(os.environ.get("FAKE_DIE_AT", "0"))
step_s = float(os.environ.get("FAKE_STEP_S", "0"))
out.mkdir(parents=True, exist_ok=True)
ckpts = out / "checkpoints"
done = sorted(p for p in ckpts.glob("step_*") if (p / "manifest.json").is_file()) if ckpts.is_dir() else []
start = int(done[-1].name[5:]) if done else 0
with open(out / "starts.txt", "a") as f:
    f.write(f"{start}\n")
metrics = out / "metrics.jsonl"
keep = [ln for ln in (metrics.read_text().splitlines() if metrics.is_file() else []) if json.loads(ln)["step"] <= start]
metrics.write_text("".join(ln + "\n" for ln in keep))
print(f"resumed from {done[-1]}" if done else "fresh start", flush=True)
for step in range(start + 1, max_steps + 1):
    if step == die_at:
        print(f"error: training: injected crash at step {step}", flush=True)
        sys.exit(3)
    time.sleep(step_s)
    with open(metrics, "a") as f:
        f.write(json.dumps({"step": step, "loss": 10.0 - step, "tokens_per_s": 100.0}) + "\n")
    d = ckpts / f"step_{step:08d}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text("{}")
print(f"done: step {max_steps}", flush=True)
