"""Routing plots of a run directory: expert load per modality, top-expert overlap, loss per modality term.

matplotlib (Agg backend, files only) is imported when a plot is drawn, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ernie5.analysis.routing import (load_fractions, modality_report, normalised_entropy, read_metrics,
                                     read_routing)
from ernie5.errors import UserError

# per-modality loss terms in metrics.jsonl (multimodal runs) and how they are labelled
LOSS_TERMS = {"loss_text": "text", "loss_visual": "visual (image + video)", "loss_audio": "audio"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("matplotlib", "not installed (pip install matplotlib); needed for `ernie5 viz`") from None
    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def plot_routing(run_dir, out_dir=None, last: int | None = None, frac: float = 0.25) -> list[Path]:
    """Write routing_heatmap.png, routing_iou.png, loss_by_modality.png and routing_summary.json into `out_dir`
    (default RUN_DIR/plots) and return their paths. `last` keeps only the newest N routing records."""
    run_dir = Path(run_dir)
    loads = read_routing(run_dir, last=last)  # inputs first: a bad run dir fails before anything is written
    metrics = read_metrics(run_dir)
    report = modality_report(loads, frac=frac)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(str(out), "exists and is not a directory") from None
    plt = _pyplot()
    paths = [
        _heatmap(plt, loads, out / "routing_heatmap.png"),
        _iou(plt, report, out / "routing_iou.png"),
        _losses(plt, metrics, out / "loss_by_modality.png"),
    ]
    summary = out / "routing_summary.json"
    summary.write_text(json.dumps({"run_dir": str(run_dir), "last": last, **report}, indent=1, allow_nan=False)
                       + "\n")
    return paths + [summary]


def _heatmap(plt, loads: dict, path: Path) -> Path:
    """One panel per modality: layer x expert image of load fractions on one shared colour scale."""
    names = list(loads)
    fracs = {n: load_fractions(loads[n]) for n in names}
    L, E = next(iter(fracs.values())).shape
    vmax = max(float(f.max()) for f in fracs.values()) or 1.0
    M = len(names)
    ncols = M if M <= 3 else 2
    nrows = math.ceil(M / ncols)
    width, height = min(4.2, 1.4 + 0.2 * E), min(7.0, 1.6 + 0.3 * L)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(6.0, width * ncols + 1.2), height * nrows + 0.4), squeeze=False,
                             constrained_layout=True)
    flat = axes.ravel().tolist()
    for ax in flat[M:]:
        ax.set_visible(False)
    for i, (ax, n) in enumerate(zip(flat, names)):
        im = ax.imshow(fracs[n], vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto", interpolation="nearest")
        rows = np.asarray(loads[n]).sum(1) > 0
        ent = normalised_entropy(loads[n])[rows]
        ax.set_title(f"{n}  (entropy {ent.mean():.2f})" if ent.size else f"{n}  (no load)", fontsize=10)
        ax.set_xlabel("expert")
        ax.set_xticks(range(0, E, max(1, math.ceil(E / 16))))
        ax.set_yticks(range(0, L, max(1, math.ceil(L / 24))))
        if i % ncols == 0:
            ax.set_ylabel("MoE layer")
    fig.colorbar(im, ax=flat[:M], label="fraction of the layer's routed slots", shrink=0.9)
    fig.suptitle("expert load by modality (entropy: mean normalised, 1 = uniform)", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _iou(plt, report: dict, path: Path) -> Path:
    """M x M matrix of top-expert IoU (mean over layers), each cell annotated."""
    names = report["iou"]["names"]
    mat = np.array([[math.nan if v is None else v for v in row] for row in report["iou"]["matrix"]], dtype=float)
    M = len(names)
    side = 2.2 + 0.9 * M
    fig, ax = plt.subplots(figsize=(side + 1.0, side), constrained_layout=True)
    im = ax.imshow(np.ma.masked_invalid(mat), vmin=0.0, vmax=1.0, cmap="magma", interpolation="nearest")
    for i in range(M):
        for j in range(M):
            v = mat[i, j]
            ax.text(j, i, "-" if not math.isfinite(v) else f"{v:.2f}", ha="center", va="center", fontsize=10,
                    color="black" if math.isfinite(v) and v > 0.6 else "white")
    ax.set_xticks(range(M), names, rotation=30, ha="right")
    ax.set_yticks(range(M), names)
    pct = round(100 * report["top_frac"])
    ax.set_title(f"IoU of the top-{pct}% experts (mean over layers)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _series(metrics: list[dict], key: str) -> tuple[list, list]:
    pts = [(m["step"], m[key]) for m in metrics
           if isinstance(m.get(key), (int, float)) and isinstance(m.get("step"), (int, float))
           and math.isfinite(m[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _losses(plt, metrics: list[dict], path: Path) -> Path:
    """Loss per modality term against step, the total loss for reference and val_loss points when logged."""
    fig, ax = plt.subplots(figsize=(7.0, 4.2), constrained_layout=True)
    drawn = 0
    for key, label in LOSS_TERMS.items():
        x, y = _series(metrics, key)
        if x:
            ax.plot(x, y, label=label, linewidth=1.4)
            drawn += 1
    x, y = _series(metrics, "loss")
    if x:
        ax.plot(x, y, label="total loss", color="grey", linewidth=1.0, linestyle="--", alpha=0.8)
    x, y = _series(metrics, "val_loss")
    if x:
        ax.scatter(x, y, label="val_loss", color="black", marker="o", s=18, zorder=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss by modality" if drawn else "loss (no per-modality terms in metrics.jsonl)", fontsize=10)
    if ax.has_data():
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
