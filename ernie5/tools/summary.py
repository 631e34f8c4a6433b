"""The end-of-run summary scripts/demo.sh prints: `python -m ernie5.tools.summary RUN_DIR [--unified]`.

Like is compared with like. The held-out loss is a text next-token loss (text runs) or the sum of the
per-modality losses (unified runs), so beside it stands the same quantity on the training batches: `loss_ntp`,
or `loss_text + loss_visual + loss_audio`; never the logged total `loss`, which adds 0.3 x MTP and the auxiliary
balance terms. Speed is the median tokens/s and MFU over the logged steps: the last step also pays for the final
checkpoint and evaluation, the first one for warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ernie5.constants import MODALITY_TERMS

LOSS_TERMS = tuple(f"loss_{m}" for m in MODALITY_TERMS)  # the unified run's per-modality loss terms


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no metrics (has the run logged a step?)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"error: {path}: empty")
    return rows


def is_unified(rows: list[dict]) -> bool:
    return any(r.get("loss_text") is not None for r in rows)


def train_text_loss(row: dict, unified: bool) -> float | None:
    """The training loss the held-out loss measures, for one logged step (None if the step did not log it)."""
    if not unified:
        return row.get("loss_ntp")
    terms = [row.get(k) for k in LOSS_TERMS if k in row]
    return None if not terms or any(t is None for t in terms) else float(sum(terms))


def median_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _first_last(rows: list[dict], value) -> tuple[tuple[float, int], tuple[float, int]] | None:
    points = [(v, r["step"]) for r in rows if (v := value(r)) is not None]
    return (points[0], points[-1]) if points else None


def _span(fl) -> str:
    (a, sa), (b, sb) = fl
    return f"{a:.3f} (step {sa}) -> {b:.3f} (step {sb})"


def loss_lines(rows: list[dict], unified: bool) -> list[str]:
    """Train loss (the held-out quantity on training batches) first -> last, then the held-out loss with the train
    loss at the same steps beside it."""
    what = "text + visual + audio" if unified else "text NTP"
    lines = []
    train = _first_last(rows, lambda r: train_text_loss(r, unified))
    if train:
        lines.append(f"train loss       {_span(train)}   [{what}; the total loss also has MTP and aux terms]")
    held = _first_last(rows, lambda r: r.get("val_loss"))
    if held:
        line = f"held-out loss    {_span(held)}"
        at = {r["step"]: train_text_loss(r, unified) for r in rows if r.get("val_loss") is not None}
        a, b = at.get(held[0][1]), at.get(held[1][1])
        if a is not None and b is not None:
            line += f"   train at those steps {a:.3f} -> {b:.3f}"
        lines.append(line)
    lines += source_lines(rows)
    return lines


def source_lines(rows: list[dict]) -> list[str]:
    """Per data source: its share of the tokens seen and its held-out loss first -> last."""
    last = rows[-1]
    seen = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("tokens_seen/")}
    total = sum(seen.values())
    lines = []
    for name, n in seen.items():
        line = f"source {name:<10} {n} tokens seen ({n / total:.0%})" if total else f"source {name}"
        held = _first_last(rows, lambda r: r.get(f"val_loss/{name}"))
        if held:
            line += f", held-out loss {_span(held)}"
        lines.append(line)
    return lines


def speed_line(rows: list[dict]) -> str | None:
    tps, mfu = median_of(rows, "tokens_per_s"), median_of(rows, "mfu")
    if tps is None:
        return None
    n = sum(1 for r in rows if r.get("tokens_per_s") is not None)
    mfu_text = f"   MFU {mfu:.3f} (vs in-process fp32 GEMM peak)" if mfu is not None else ""
    return f"tokens/s         {tps:.0f}{mfu_text}   median of {n} logged steps"


def text_summary(run_dir: str | Path) -> str:
    run = Path(run_dir)
    rows = read_metrics(run)
    lines = ["", "== summary", f"run dir          {run}", f"steps            {rows[-1]['step']}"]
    lines += loss_lines(rows, is_unified(rows))
    if (speed := speed_line(rows)) is not None:
        lines.append(speed)
    balance = rows[-1].get("moe_max_over_mean")
    lines.append(f"expert balance   max/mean load {balance if balance is not None else float('nan'):.2f}")
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    lines.append(f"checkpoint       {ckpts[-1] if ckpts else 'none'}")
    lines.append(f"exports          {run / 'export_hf'} (transformers), {run / 'export_native'} (ernie5.load_model)")
    return "\n".join(lines)


def unified_summary(run_dir: str | Path) -> str:
    run = Path(run_dir)
    rows = read_metrics(run)
    lines = ["", "== unified summary", f"run dir          {run}  ({rows[-1]['step']} steps)"]
    for key in LOSS_TERMS:
        fl = _first_last(rows, lambda r, k=key: r.get(k))
        if fl:
            lines.append(f"{key:<16} {fl[0][0]:.3f} -> {fl[1][0]:.3f}")
    lines += loss_lines(rows, unified=True)
    if (speed := speed_line(rows)) is not None:
        lines.append(speed)
    lines.append(f"plots            {run / 'plots'} (routing heatmaps per modality, expert IoU, loss per modality)")
    lines.append(f"export           {run / 'export_native'} (ernie5.load_model)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ernie5.tools.summary",
                                 description="Print the demo's summary of a run directory (metrics.jsonl).")
    ap.add_argument("run_dir")
    ap.add_argument("--unified", action="store_true", help="the unified run's summary (per-modality losses)")
    args = ap.parse_args(argv)
    print(unified_summary(args.run_dir) if args.unified else text_summary(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
