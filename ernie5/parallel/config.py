"""Parallel layout (paddle-free): degrees of data, sharding, expert, tensor and pipeline parallelism."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ernie5.config.schema import join, require


@dataclass
class ParallelConfig:
    """world size = data x tensor x pipeline; expert-parallel groups are carved out of the data-parallel ranks
    (ERNIE 4.5 / Megatron): experts are sharded over `expert` ranks, everything else is replicated."""

    data: Optional[int] = None  # null: every launched process not used by tensor / pipeline parallelism
    sharding_stage: int = 0  # 1: ZeRO-1, optimizer states sharded over the data-parallel ranks
    expert: int = 1
    tensor: int = 1  # GPU only (fleet's tensor parallel does not run on CPU)
    pipeline: int = 1  # GPU only
    virtual_pipeline: int = 1  # interleaved virtual stages per pipeline rank

    @property
    def world_size(self) -> int:
        """Devices this layout names (data null counts as 1: the launcher decides)."""
        return (self.data or 1) * self.tensor * self.pipeline

    def validate(self, path: str) -> None:
        for name in ("expert", "tensor", "pipeline", "virtual_pipeline"):
            require(getattr(self, name) >= 1, join(path, name), f"{getattr(self, name)} must be >= 1")
        require(self.sharding_stage in (0, 1), join(path, "sharding_stage"),
                f"{self.sharding_stage} must be 0 or 1 (ZeRO-1)")
        if self.data is not None:
            require(self.data >= 1, join(path, "data"), f"{self.data} must be >= 1")
            require(self.data % self.expert == 0, join(path, "expert"),
                    f"{self.expert} does not divide the data-parallel degree {self.data}")
