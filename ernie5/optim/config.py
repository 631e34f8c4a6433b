"""Optimizer and learning-rate schedule config (paddle-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ernie5.config.schema import join, require


@dataclass
class OptimConfig:
    """AdamW with a warmup + {wsd, cosine, constant} schedule and global-norm clipping."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_steps: int = 10
    decay_fraction: float = 0.1  # wsd: the last fraction of max_steps decays linearly to min_lr
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms, biases or router bias
    grad_clip: float = 1.0  # 0: no clipping
    router_lr_ratio: float = 1.0  # router LR = ratio * LR (ERNIE 4.5 uses 0.01)

    def validate(self, path: str) -> None:
        require(self.lr > 0, join(path, "lr"), "must be > 0")
        require(0 <= self.min_lr <= self.lr, join(path, "min_lr"), f"{self.min_lr} must be in [0, lr={self.lr}]")
        require(self.warmup_steps >= 0, join(path, "warmup_steps"), "must be >= 0")
        require(0 <= self.decay_fraction <= 1, join(path, "decay_fraction"), "must be in [0, 1]")
        require(0 <= self.beta1 < 1, join(path, "beta1"), "must be in [0, 1)")
        require(0 <= self.beta2 < 1, join(path, "beta2"), "must be in [0, 1)")
        require(self.weight_decay >= 0, join(path, "weight_decay"), "must be >= 0")
        require(self.grad_clip >= 0, join(path, "grad_clip"), "must be >= 0")
        require(self.router_lr_ratio > 0, join(path, "router_lr_ratio"), "must be > 0")
