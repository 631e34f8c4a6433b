"""What is observed or written after a step, as callbacks run in list order after every optimizer step:
routing statistics, held-out evaluation, metrics.jsonl / progress, periodic checkpoints.

A callback sees the trainer and the step's metrics dict (it may add keys before the logger writes them). The
training algorithm itself (optimizer step, router updates) is not a callback: removing callbacks never changes
what is trained.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ernie5.constants import MODALITY_NAMES, NUM_MODALITIES
from ernie5.errors import UserError

if TYPE_CHECKING:
    from ernie5.train.trainer import Trainer


class Callback:
    def on_step_end(self, tr: "Trainer", metrics: dict) -> None:
        pass

    def on_train_end(self, tr: "Trainer") -> None:
        pass


def routing_summary(counts_LE: np.ndarray) -> dict:
    """Max/mean load and normalised load entropy (1 = perfectly balanced), per layer and averaged."""
    frac = counts_LE / np.maximum(counts_LE.sum(1, keepdims=True), 1)
    E = counts_LE.shape[1]
    ent = -(np.where(frac > 0, frac * np.log(np.where(frac > 0, frac, 1)), 0)).sum(1) / math.log(E)
    maxmean = counts_LE.max(1) / np.maximum(counts_LE.mean(1), 1e-9)
    return {"max_over_mean": maxmean, "entropy": ent}


class RoutingStats(Callback):
    """Per-layer expert loads over each log window -> metrics (means) and routing.jsonl (per layer, per expert)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / "routing.jsonl"
        self.window = None
        self.by_modality = None  # [4, L, E] for unified runs

    def on_step_end(self, tr, metrics):
        if not any(tr.cfg.model.is_moe_layer(i) for i in range(tr.cfg.model.num_layers)):
            return
        counts = tr.routing_counts("step_counts")  # every MoE layer, whichever pipeline stage holds it
        self.window = counts if self.window is None else self.window + counts
        by_mod = tr.routing_counts("modality_counts").transpose(1, 0, 2)  # [4, L, E]
        self.by_modality = by_mod if self.by_modality is None else self.by_modality + by_mod
        if not metrics.get("log"):
            return
        s = routing_summary(self.window)
        metrics["moe_max_over_mean"] = float(s["max_over_mean"].mean())
        metrics["moe_load_entropy"] = float(s["entropy"].mean())
        if tr.is_main:
            rec = {"step": metrics["step"], "load": self.window.tolist(),
                   "max_over_mean": s["max_over_mean"].round(4).tolist(), "entropy": s["entropy"].round(4).tolist()}
            if self.by_modality.any():  # unified runs: which experts each modality's tokens chose
                rec["load_by_modality"] = {MODALITY_NAMES[m]: self.by_modality[m].tolist()
                                           for m in range(NUM_MODALITIES) if self.by_modality[m].any()}
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        self.window = None
        self.by_modality = None


class Evaluator(Callback):
    """Held-out loss every `train.eval_interval` steps and at the end."""

    def on_step_end(self, tr, metrics):
        every = tr.cfg.train.eval_interval
        if every and (metrics["step"] % every == 0 or metrics["step"] == tr.cfg.train.max_steps):
            metrics.update(tr.evaluate() or {"val_loss": None})


class MetricsLogger(Callback):
    """metrics.jsonl (rank 0), the progress bar or a plain log line, and optional VisualDL scalars."""

    def __init__(self, out_dir: Path, visualdl: bool):
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if visualdl:
            try:
                from visualdl import LogWriter
            except ImportError:
                raise UserError("train.visualdl", "visualdl is not installed (pip install visualdl)") from None
            self.writer = LogWriter(logdir=str(out_dir / "visualdl"))

    def on_step_end(self, tr, metrics):
        if not metrics.get("log") or not tr.is_main:
            return
        record = {k: v for k, v in metrics.items() if k != "log"}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(tag=f"train/{k}", value=float(v), step=metrics["step"])
        tr.report(metrics)

    def on_train_end(self, tr):
        if self.writer is not None:
            self.writer.close()


class PeriodicCheckpoint(Callback):
    """Save every `checkpoint.interval` steps and at the end of training."""

    def on_step_end(self, tr, metrics):
        every = tr.cfg.checkpoint.interval
        if metrics.get("rolled_back"):
            return
        if (every and metrics["step"] % every == 0) or metrics["step"] == tr.cfg.train.max_steps:
            tr.save_checkpoint()
