"""Process topology: which rank does what, and the communication groups, from `parallel:` and the launch env.

world = data x tensor x pipeline. Tensor-parallel groups are consecutive ranks (fleet's order: the tensor axis is
innermost); a TP group's ranks share one data-parallel rank and read the same batches. Expert parallelism is carved from the data-parallel ranks (ERNIE 4.5 /
Megatron): data rank d is in expert-parallel group d // ep (consecutive blocks of `ep` ranks share one copy of
all experts, rank d % ep holding the slice [e * E/ep, (e+1) * E/ep)), and in expert-data-parallel group
d % ep (the ranks holding the same expert slice, whose expert gradients are averaged together).
Fleet's hybrid communicate group carries data parallel, ZeRO-1 sharding, tensor and pipeline groups.
Experts are replicated over the TP ranks (see `ernie5.model.moe.MoELayer`), so expert-parallel groups are formed
among the data-parallel ranks of one TP rank.
A single process gets a trivial topology and no communication at all.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import paddle

from ernie5.comm.regions import TPGroup
from ernie5.parallel.pipeline import PipeGroup
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
    tp: TPGroup = field(default_factory=TPGroup)  # this rank's tensor-parallel group (degree 1: none)
    pipe: Optional[PipeGroup] = None  # this rank's pipeline (None: no pipeline parallelism)
    embed_group: Any = None  # first + last stage of this pipeline: the tied embedding's two copies
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

    def sum_over_data_and_stages(self, x: np.ndarray) -> np.ndarray:
        """Sum over the data-parallel ranks and the pipeline stages (what only the last stage measures, zeros
        elsewhere, reaches every stage)."""
        x = self.sum_array(x)
        return self.sum_array(x, group=self.pipe.group) if self.pipe is not None else x

    def sum_over_token_ranks(self, x: np.ndarray) -> np.ndarray:
        """Sum over the ranks that see different tokens with the same layers: the data-parallel ranks, and with
        sequence parallelism their tensor-parallel ranks too."""
        if not self.distributed:
            return x
        x = self.sum_array(x)
        return self.sum_array(x, group=self.tp.group) if self.tp.sequence_parallel else x

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


@contextlib.contextmanager
def _one_group_at_a_time(gloo: bool):
    """Gloo (CPU) fails to set up overlapping subgroups created back to back (4 ranks, TP groups {0,1} {2,3}
    then DP groups {0,2} {1,3}: "connection refused" / TIMEOUT while pairing); with a barrier after each
    `new_group` every layout comes up (a gloo barrier in between still failed now and then on a loaded host:
    "address size 136 vs 45", a peer's rendezvous read as another's). Applies to fleet's own hybrid groups too,
    which it creates through `paddle.distributed.new_group`. NCCL needs no such care."""
    if not gloo:
        yield
        return
    import time

    from paddle.distributed import collective

    original = paddle.distributed.new_group
    world = paddle.distributed.get_world_size()
    made = [0]

    def new_group(ranks=None, *args, **kwargs):
        if ranks is not None and sorted(ranks) == list(range(world)):
            # a second group of every rank (fleet's "check" group when data degree is 1) failed to pair on gloo
            # more often than not: the default group has the same members
            return collective._get_default_group()
        # wait on the launcher's TCP store (no gloo traffic between two groups' set-ups) until every rank has
        # made this group
        group = original(ranks, *args, **kwargs)
        made[0] += 1
        store, key = collective._default_store, f"ernie5/new_group/{made[0]}"
        store.add(key, 1)
        deadline = time.monotonic() + 600
        while store.add(key, 0) < world:
            if time.monotonic() > deadline:
                raise RuntimeError(f"process group {made[0]} was not set up by every rank within 600 s")
            time.sleep(0.01)
        return group

    paddle.distributed.new_group = new_group
    try:
        yield
    finally:
        paddle.distributed.new_group = original


def init_topology(cfg: ParallelConfig, world: Optional[int] = None) -> Topology:
    """Validate the layout against the launched processes and build the groups (fleet when world > 1)."""
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
    gloo = not paddle.is_compiled_with_cuda()
    with _one_group_at_a_time(gloo):
        fleet.init(is_collective=True, strategy=strategy)
        hcg = fleet.get_hybrid_communicate_group()
        topo = _with_groups(cfg, world, dp, hcg, gloo)
    return topo


def _with_groups(cfg: ParallelConfig, world: int, dp: int, hcg, gloo: bool) -> Topology:
    """This rank's topology from fleet's hybrid groups, plus the expert-parallel groups."""
    sharding = dp if cfg.sharding_stage == 1 else 1
    rank = paddle.distributed.get_rank()
    dp_group = hcg.get_sharding_parallel_group() if sharding > 1 else hcg.get_data_parallel_group()
    dp_ranks = list(dp_group.ranks)
    dp_rank = dp_ranks.index(rank)
    backend = "gloo" if gloo else "nccl"
    tp = TPGroup()
    if cfg.tensor > 1:
        mp_group = hcg.get_model_parallel_group()
        tp = TPGroup(cfg.tensor, list(mp_group.ranks).index(rank), cfg.sequence_parallel_on, mp_group,
                     native=backend == "nccl")
    topo = Topology(world=world, rank=rank, dp=dp, dp_rank=dp_rank, ep=cfg.expert, ep_rank=dp_rank % cfg.expert,
                    tp=tp, sharding_stage=cfg.sharding_stage, backend=backend, hcg=hcg, dp_group=dp_group)
    fleet_topo = hcg.topology()
    if cfg.pipeline > 1:
        pp_group = hcg.get_pipe_parallel_group()
        ranks = list(pp_group.ranks)
        s = ranks.index(rank)
        topo.pipe = PipeGroup(s, cfg.pipeline, ranks[s - 1] if s > 0 else None,
                              ranks[s + 1] if s + 1 < len(ranks) else None, pp_group, ranks[-1], tuple(ranks))
        links = {}  # every rank creates every pipeline's groups, in order: neighbour pairs (a ring), the ends
        for line in fleet_topo.get_comm_list("pipe"):
            for a, b in sorted({tuple(sorted((line[i], line[(i + 1) % len(line)]))) for i in range(len(line))}):
                g = paddle.distributed.new_group([a, b])
                if rank in (a, b):
                    links[b if rank == a else a] = g
            if rank in (line[0], line[-1]):  # the ring's link between the ends carries the tied embedding
                topo.embed_group = links[line[-1] if rank == line[0] else line[0]]
        topo.pipe.links = links
    if cfg.expert > 1:  # every rank must create every group (those of every TP / PP rank), in the same order
        for ranks_of in fleet_topo.get_comm_list("sharding" if sharding > 1 else "data"):
            for block in range(dp // cfg.expert):
                ranks = [ranks_of[block * cfg.expert + i] for i in range(cfg.expert)]
                g = paddle.distributed.new_group(ranks)
                if rank in ranks:
                    topo.ep_group = g
            for slot in range(cfg.expert):
                ranks = [ranks_of[i] for i in range(slot, dp, cfg.expert)]
                g = paddle.distributed.new_group(ranks) if len(ranks) > 1 else None
                if rank in ranks:
                    topo.edp_group = g
        assert topo.ep_group is not None
    return topo
