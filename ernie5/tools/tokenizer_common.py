"""Shared pieces of the tokenizer training loops (`vision_train`, `audio_train`): the learning-rate schedule, the
held-out split and PSNR."""

from __future__ import annotations

import math

import numpy as np

from ernie5.data.digits_world import is_heldout

def _lr(step: int, cfg) -> float:
    """Short linear warm-up, then cosine to min_lr."""
    warm = max(1, cfg.steps // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(1, cfg.steps - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def _split(n: int) -> tuple[np.ndarray, np.ndarray]:
    held = np.array([is_heldout(i) for i in range(n)])
    return np.nonzero(~held)[0], np.nonzero(held)[0]


def _to_pixels(u8: np.ndarray) -> np.ndarray:
    return u8.astype(np.float32) / 127.5 - 1.0


def psnr(rec: np.ndarray, ref: np.ndarray) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((np.clip(rec, -1, 1) - ref) ** 2).mean())
    return 10 * math.log10(4.0 / max(mse, 1e-12))
