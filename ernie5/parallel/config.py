"""Parallel layout (paddle-free): degrees of data, sharding, expert, tensor and pipeline parallelism."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ernie5.config.schema import join, require


@dataclass
class ParallelConfig:
    """world size = data x tensor x pipeline; expert-parallel groups are carved out of the data-parallel ranks
    (ERNIE 4.5 / Megatron): experts are sharded over `expert` ranks, everything else is replicated."""

    data: Optional[int] = None  # null: every launched process not used by tensor / pipeline parallelism
    sharding_stage: int = 0  # 1: ZeRO-1, optimizer states sharded over the data-parallel ranks
    expert: int = 1
    tensor: int = 1  # Megatron-style tensor parallelism (heads, FFN columns / rows, vocabulary)
    sequence_parallel: Optional[bool] = None  # null: on when tensor > 1 (norms, residuals, MoE on sequence shards)
    pipeline: int = 1  # pipeline stages (1F1B; interleaved with virtual_pipeline > 1)
    virtual_pipeline: int = 1  # interleaved virtual stages per pipeline rank
    pipeline_layout: Optional[list[int]] = None  # layers per chunk (pipeline x virtual_pipeline); null: by balance
    pipeline_balance: Literal["even", "compute"] = "even"  # even layer counts, or equal FLOPs per chunk

    @property
    def sequence_parallel_on(self) -> bool:
        return self.tensor > 1 and self.sequence_parallel is not False

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


def check_tensor_parallel(parallel: ParallelConfig, model, seq_len: int) -> None:
    """The model shapes a tensor-parallel degree P can split (`model`: a ModelConfig): query heads, kv heads
    (divisible by P, or a divisor of P: then replicated), FFN widths; sequence parallelism splits each row."""
    P = parallel.tensor
    if P == 1:
        return
    require(model.num_heads % P == 0, "model.num_heads",
            f"{model.num_heads} is not divisible by parallel.tensor {P}")
    K = model.num_kv_heads
    require(K % P == 0 or P % K == 0, "model.num_kv_heads",
            f"{K} kv heads cannot be split over parallel.tensor {P} (need a multiple of {P}, or a divisor of it "
            "to replicate kv heads)")
    require(model.ffn_hidden_size % P == 0, "model.ffn_hidden_size",
            f"{model.ffn_hidden_size} is not divisible by parallel.tensor {P}")
    moe = model.moe
    if moe.num_experts and moe.num_shared_experts:
        width = moe.expert_ffn_size * moe.num_shared_experts
        require(width % P == 0, "model.moe.num_shared_experts",
                f"shared-expert width {width} is not divisible by parallel.tensor {P}")
    if parallel.sequence_parallel_on:
        require(seq_len % P == 0, "data.seq_len",
                f"{seq_len} is not divisible by parallel.tensor {P} (sequence parallelism splits each row)")
        require(not moe.isolated, "parallel.sequence_parallel",
                "isolated routing runs without sequence parallelism (set parallel.sequence_parallel=false)")
