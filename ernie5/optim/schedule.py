"""Learning-rate schedules (plain Python)."""

from __future__ import annotations

import math

from ernie5.optim.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (1-based): linear warmup, then wsd / cosine / constant to `min_lr`."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(max_steps - cfg.warmup_steps, 1)
        frac = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
    decay_steps = int(round(cfg.decay_fraction * max_steps))  # wsd: warmup, stable, linear decay at the end
    decay_start = max_steps - decay_steps
    if decay_steps == 0 or step <= decay_start:
        return cfg.lr
    frac = min((step - decay_start) / decay_steps, 1.0)
    return cfg.lr + (cfg.min_lr - cfg.lr) * frac
