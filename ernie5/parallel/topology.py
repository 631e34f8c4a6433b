"""Process topology: which rank does what, and the communication groups, from `parallel:` and the launch env.

world = data x tensor x pipeline. Expert parallelism is carved from the data-parallel ranks (ERNIE 4.5 /
Megatron): data rank d is in expert-parallel group d // ep (consecutive blocks of `ep` ranks share one copy of
all experts, rank d % ep holding the slice [e * E/ep, (e+1) * E/ep)), and in expert-data-parallel group
d % ep (the ranks holding the same expert slice, whose expert gradients are averaged together).
Fleet's hybrid communicate group carries data parallel and ZeRO-1 sharding (and tensor / pipeline on GPUs).
A single process gets a trivial topology and no communication at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import paddle

from ernie5.errors import UserError
from ernie5.parallel.config import ParallelConfig


def launched_world_size() -> int:
    """Processes started by paddle.distributed.launch (1 when run directly)."""
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


@dataclass
class Topology:
    world: int = 1
    rank: int = 0
    dp: int = 1  # data-parallel degree (including ZeRO-1 sharding ranks)
    dp_rank: int = 0
    ep: int = 1
    ep_rank: int = 0  # which expert slice this rank holds
    sharding_stage: int = 0
    backend: str = "gloo"
    hcg: Any = None  # fleet's HybridCommunicateGroup (None in one process)
    ep_group: Any = None
    edp_group: Any = None
    dp_group: Any = None
    groups_made: list = field(default_factory=list)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def edp(self) -> int:
        """Size of the expert-data-parallel group (ranks holding the same experts)."""
        return self.dp // self.ep

    def local_experts(self, num_experts: int) -> list[int]:
        per = num_experts // self.ep
        return list(range(self.ep_rank * per, (self.ep_rank + 1) * per))

    # ---- small collectives used by the trainer (no-ops in one process) ------------------------------------
    def sum_array(self, x: np.ndarray, group=None) -> np.ndarray:
        """Sum a numpy array over `group` (default: the data-parallel ranks)."""
        if not self.distributed:
            return x
        t = paddle.to_tensor(np.ascontiguousarray(x, dtype=np.float64))
        paddle.distributed.all_reduce(t, group=group or self.dp_group)
        return t.numpy().astype(x.dtype)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (keeps skip/stop decisions identical)."""
        if not self.distributed:
            return flag
        t = paddle.to_tensor([1.0 if flag else 0.0])
        paddle.distributed.all_reduce(t, op=paddle.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.distributed:
            paddle.distributed.barrier()

    def broadcast_int(self, value: int) -> int:
        if not self.distributed:
            return value
        t = paddle.to_tensor([value], dtype="int64")
        paddle.distributed.broadcast(t, src=0)
        return int(t.item())


def resolve_data_degree(cfg: ParallelConfig, world: int) -> int:
    """`parallel.data` null means: every rank not used by tensor / pipeline parallelism."""
    model_ranks = cfg.tensor * cfg.pipeline
    if cfg.data is None:
        if world % model_ranks:
            raise UserError("parallel", f"{world} processes are not a multiple of tensor x pipeline = {model_ranks}")
        return world // model_ranks
    return cfg.data


def init_topology(cfg: ParallelConfig, world: Optional[int] = None) -> Topology:
    """Validate the layout against the launched processes and build the groups (fleet when world > 1)."""
    # the model has no tensor or pipeline split yet: every rank would silently compute the whole model, so
    # these layouts are refused on every build until the split exists (`ernie5 plan` still sizes them)
    for name in ("tensor", "pipeline"):
        if getattr(cfg, name) > 1:
            raise UserError(f"parallel.{name}", f"{getattr(cfg, name)} > 1 is not supported yet (the model has no "
                                                f"{name}-parallel split); use data / sharding / expert parallelism")
    world = launched_world_size() if world is None else world
    dp = resolve_data_degree(cfg, world)
    want = dp * cfg.tensor * cfg.pipeline
    if want != world:
        raise UserError("parallel", f"data {dp} x tensor {cfg.tensor} x pipeline {cfg.pipeline} = {want}, but "
                                    f"{world} processes were launched")
    if dp % cfg.expert:
        raise UserError("parallel.expert", f"{cfg.expert} does not divide the data-parallel degree {dp}")
    if world == 1:
        return Topology(sharding_stage=cfg.sharding_stage)
    from paddle.distributed import fleet

    strategy = fleet.DistributedStrategy()
    sharding = dp if cfg.sharding_stage == 1 else 1
    strategy.hybrid_configs = {"dp_degree": dp // sharding, "sharding_degree": sharding,
                               "mp_degree": cfg.tensor, "pp_degree": cfg.pipeline}
    fleet.init(is_collective=True, strategy=strategy)
    hcg = fleet.get_hybrid_communicate_group()
    rank = paddle.distributed.get_rank()
    dp_group = hcg.get_sharding_parallel_group() if sharding > 1 else hcg.get_data_parallel_group()
    dp_ranks = list(dp_group.ranks)
    dp_rank = dp_ranks.index(rank)
    topo = Topology(world=world, rank=rank, dp=dp, dp_rank=dp_rank, ep=cfg.expert, ep_rank=dp_rank % cfg.expert,
                    sharding_stage=cfg.sharding_stage, backend="nccl" if paddle.is_compiled_with_cuda() else "gloo",
                    hcg=hcg, dp_group=dp_group)
    if cfg.expert > 1:  # every rank must create every group, in the same order
        for block in range(dp // cfg.expert):
            ranks = [dp_ranks[block * cfg.expert + i] for i in range(cfg.expert)]
            g = paddle.distributed.new_group(ranks)
            if rank in ranks:
                topo.ep_group = g
        for slot in range(cfg.expert):
            ranks = [dp_ranks[i] for i in range(slot, dp, cfg.expert)]
            g = paddle.distributed.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                topo.edp_group = g
    return topo
