"""The report's plots: train and held-out loss curves of every run overlaid (one colour per variant, one line per
seed), and the scaling ladder's points with the fitted power law. matplotlib with the Agg backend (files only),
imported when a plot is drawn; PNGs are written without a timestamp or software tag."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ernie5.errors import UserError

_STYLES = ("-", "--", ":", "-.")
_PNG_META = {"Software": None}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("matplotlib", "not installed (pip install matplotlib); needed for the report's plots") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(groups, key: str, title: str, path: Path) -> Optional[Path]:
    """`key` ("loss" or "val_loss") against step for every run of every group; None if no run logged it."""
    if not any(r.curves.get(key) for g in groups for r in g.runs):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = plt.get_cmap("tab10")
    for gi, g in enumerate(groups):
        for si, r in enumerate(g.runs):
            pts = r.curves.get(key) or []
            if not pts:
                continue
            steps, values = zip(*pts)
            ax.plot(steps, values, _STYLES[si % len(_STYLES)], color=colours(gi % 10), lw=1.4,
                    marker="o" if len(pts) <= 12 else None, ms=3,
                    label=f"{g.variant} seed {r.seed}")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if sum(len(g.runs) for g in groups) > 6 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=_PNG_META)
    plt.close(fig)
    return path


def plot_ladder(names: list[str], compute: list[float], loss: list[float], fit, next_point, path: Path) -> Path:
    """Loss against compute on log-log axes: the rungs, the fitted line and the predicted next rung."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.loglog(compute, loss, "o", color="C0", label="rungs (mean over seeds)")
    for n, c, v in zip(names, compute, loss):
        ax.annotate(n, (c, v), textcoords="offset points", xytext=(4, 4), fontsize=7)
    hi = next_point[0] if next_point else max(compute)
    xs = np.geomspace(min(compute), hi, 50)
    ax.loglog(xs, fit.predict(xs), "-", color="C1", label=f"fit: L = {fit.a:.3g} C^-{fit.b:.4f}")
    if next_point:
        c, v, interval = next_point
        yerr = None if interval is None else [[v - interval[0]], [interval[1] - v]]
        ax.errorbar([c], [v], yerr=yerr, fmt="s", color="C3", capsize=3, label="predicted next size")
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow log range labels every minor tick otherwise
    for fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        fmt(FormatStrFormatter("%.2f"))
    ax.set_xlabel("training compute C (FLOPs, planner)")
    ax.set_ylabel("final loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=_PNG_META)
    plt.close(fig)
    return path
