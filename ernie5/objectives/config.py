"""Unified-objective config (paddle-free; the rules are documented in `ernie5.objectives.unified`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ernie5.config.schema import join, require


@dataclass
class ObjectiveConfig:
    """Loss weights and the robustness / balancing rules of the unified objective."""

    text_weight: float = 1.0
    visual_weight: float = 1.0
    audio_weight: float = 1.0
    visual_scale_power: float = 0.5  # token of scale k weighs n_k^-p (0: per token, 1: per scale)
    bit_flip_rate: float = 0.0  # probability of flipping each bit of the visual history
    modality_weighting: Literal["none", "posterior"] = "none"
    posterior_momentum: float = 0.98
    token_balanced: bool = False
    token_balance_length: int = 0  # C per row; 0: data.seq_len

    def validate(self, path: str) -> None:
        for name in ("text_weight", "visual_weight", "audio_weight", "visual_scale_power"):
            require(getattr(self, name) >= 0, join(path, name), "must be >= 0")
        require(0 <= self.bit_flip_rate < 0.5, join(path, "bit_flip_rate"), "must be in [0, 0.5)")
        require(0 <= self.posterior_momentum < 1, join(path, "posterior_momentum"), "must be in [0, 1)")
        require(self.token_balance_length >= 0, join(path, "token_balance_length"), "must be >= 0")
