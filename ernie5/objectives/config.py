"""Unified-objective config (paddle-free; the rules are documented in `ernie5.objectives.unified`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ernie5.config.schema import join, require
from ernie5.errors import ConfigError


@dataclass
class ObjectiveConfig:
    """Loss weights and the robustness / balancing rules of the unified objective."""

    text_weight: float = 1.0
    visual_weight: float = 1.0
    audio_weight: float = 1.0
    visual_scale_power: float = 0.5  # token of scale k weighs n_k^-p (0: per token, 1: per scale)
    bit_flip_rate: float = 0.0  # probability of flipping each bit of the visual history
    old_frame_mask_rate: float = 0.0  # training: probability that a video frame is hidden from frame f + 2 on
    modality_weighting: Literal["none", "posterior"] = "none"
    posterior_momentum: float = 0.98
    token_balanced: bool = False
    token_balance_length: int = 0  # C per row; 0: data.seq_len

    def validate(self, path: str) -> None:
        for name in ("text_weight", "visual_weight", "audio_weight", "visual_scale_power"):
            require(getattr(self, name) >= 0, join(path, name), "must be >= 0")
        require(0 <= self.bit_flip_rate < 0.5, join(path, "bit_flip_rate"), "must be in [0, 0.5)")
        require(0 <= self.old_frame_mask_rate < 1, join(path, "old_frame_mask_rate"), "must be in [0, 1)")
        require(0 <= self.posterior_momentum < 1, join(path, "posterior_momentum"), "must be in [0, 1)")
        require(self.token_balance_length >= 0, join(path, "token_balance_length"), "must be >= 0")
        require(self.token_balance_length == 0 or self.token_balanced, join(path, "token_balance_length"),
                "is used only with token_balanced: true")

    def check_text_only(self, path: str) -> None:
        """A text-only run (text shards) has one loss: settings that weigh or corrupt other modalities would
        do nothing there, so they are refused rather than silently ignored. (`token_balanced` works for text.)"""
        why = "has no effect on a text-only run (data.dir holds text shards); remove it or use multimodal data"
        if self.modality_weighting != "none":
            raise ConfigError(join(path, "modality_weighting"), f"{self.modality_weighting!r} {why}")
        for name in ("bit_flip_rate", "old_frame_mask_rate"):
            if getattr(self, name) > 0:
                raise ConfigError(join(path, name), f"{getattr(self, name)} {why}")
        defaults = ObjectiveConfig()
        for name in ("text_weight", "visual_weight", "audio_weight", "visual_scale_power"):
            if getattr(self, name) != getattr(defaults, name):
                raise ConfigError(join(path, name), f"{getattr(self, name)} {why}")
