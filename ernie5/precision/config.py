"""Precision and recompute configs (paddle-free)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ernie5.config.schema import join, require

RecomputeModule = Literal["attention", "expert_gate_up", "norm_qkv"]


@dataclass
class FP8Config:
    """Blockwise FP8 (DeepSeek-V3 / ERNIE 4.5 recipe): E4M3 values, power-of-two scales per 1 x `tile`
    activation / gradient tile and per `block` x `block` weight block, higher-precision accumulation."""

    enabled: bool = False
    tile: int = 128
    block: int = 128
    apply_to: Literal["experts", "all_linear"] = "experts"
    quantize_dispatch: bool = False  # quantise tokens before the expert all-to-all
    store_activations: bool = False  # keep saved activations for backward in FP8

    def validate(self, path: str) -> None:
        require(self.tile >= 1, join(path, "tile"), "must be >= 1")
        require(self.block >= 1, join(path, "block"), "must be >= 1")


@dataclass
class PrecisionConfig:
    """`dtype: bf16`: bf16 weights and activations with fp32 master weights and Adam states; the router (weight,
    aux-free bias), norms' statistics and losses stay fp32 (ernie5/model/mixed_precision.py). GPUs run Paddle's
    AMP O2; CPUs have no bf16 GEMM, so it is emulated there (ernie5/precision/bf16.py): GEMM operands and outputs
    rounded to bf16, fp32 accumulation, fp32 parameters (they are the master weights).

    `grad_allreduce_fp32` (bf16 only): weight gradients are fp32 from the GEMM on, so they are accumulated over
    micro-batches, all-reduced, clipped and applied in fp32 (Paddle O2 `master_grad`). false: they are bf16, as
    Paddle's O2 leaves them, and all-reduced in bf16 (half the bytes); the CPU emulation then rounds each
    micro-batch's weight gradient to bf16 (its sums over micro-batches and ranks stay fp32 sums).

    With `fp8.enabled` too, the FP8 recipe keeps the linears it covers (FP8 wins) and bf16 takes the others."""

    dtype: Literal["fp32", "bf16"] = "fp32"
    grad_allreduce_fp32: bool = True
    fp8: FP8Config = field(default_factory=FP8Config)


@dataclass
class RecomputeConfig:
    """Activation recompute: `full` re-runs whole blocks in backward; `selective` only the chosen modules."""

    mode: Literal["none", "full", "selective"] = "none"
    layers: Optional[list[int]] = None  # None: every layer
    modules: list[RecomputeModule] = field(default_factory=lambda: ["attention"])  # for mode=selective

    def validate(self, path: str) -> None:
        if self.layers is not None:
            require(all(i >= 0 for i in self.layers), join(path, "layers"), "layer indices must be >= 0")
        require(len(self.modules) > 0 or self.mode != "selective", join(path, "modules"),
                "selective recompute needs at least one module")

    def applies_to(self, layer: int) -> bool:
        return self.mode != "none" and (self.layers is None or layer in self.layers)
