"""A stand-in for `ernie5 eval CKPT --mode elastic --batches N --out DIR` that the runner tests launch instead of
the real evaluator: it checks the checkpoint exists, writes DIR/elastic_eval.json with three sub-model rows (loss
from FAKE_EVAL_LOSS, default 5.0, + 0.1 per row) and appends `<mode> <batches>` to the run dir's `evals.txt`.
FAKE_EVAL_FAIL=1 makes it exit 2 with an error line instead; FAKE_EVAL_S makes it take that long first."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("ckpt")
ap.add_argument("--mode", required=True)
ap.add_argument("--batches", type=int, required=True)
ap.add_argument("--out", required=True)
args = ap.parse_args()
ckpt = Path(args.ckpt)
with open(ckpt.parent.parent / "evals.txt", "a") as f:
    f.write(f"{args.mode} {args.batches}\n")
time.sleep(float(os.environ.get("FAKE_EVAL_S", "0")))
if os.environ.get("FAKE_EVAL_FAIL") == "1":
    print("error: injected evaluation failure", flush=True)
    sys.exit(2)
if not (ckpt / "manifest.json").is_file():
    print(f"error: {ckpt}: no such checkpoint", flush=True)
    sys.exit(2)
base = float(os.environ.get("FAKE_EVAL_LOSS", "5.0"))
rows = [{"submodel": name, "loss": base + 0.1 * i, "active_params": 1000 - 100 * i, "total_params": 2000}
        for i, name in enumerate(["full", "depth=2", "top_k=1"])]
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
(out / f"{args.mode}_eval.json").write_text(json.dumps({"checkpoint": str(ckpt), "batches": args.batches,
                                                        "rows": rows}))
print(f"table, JSON and plot in {out}", flush=True)
