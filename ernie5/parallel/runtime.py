"""Optimizers and gradient synchronisation for a topology, and topology-free ("global") state dicts.

Gradients are synced once per step, after all micro-batches and before the non-finite check and clipping, so
every rank sees the same gradient norm and takes the same decision:
- pipeline parallelism first: the first and last stage's copies of the tied embedding (and of the modality
  inputs / heads module) add their gradients, so both copies take the same step;
- tensor parallelism next: parameters a TP rank applies to its own sequence shard (`param.sequence_parallel`:
  norms, routers, routed experts, MTP projections) are summed over the TP group, and kv-head weights replicated on
  several TP ranks are summed over the ranks holding them;
- dense (replicated) parameters: fleet's `fused_allreduce_gradients` over the data-parallel group, or, with
  ZeRO-1, fleet's sharding optimizer `reduce_gradients` (each parameter's gradient lands on its owner rank);
- expert parameters under expert parallelism: all-reduce over the expert-data-parallel group (ranks holding
  the same experts); each rank's local expert gradient already sums the contributions of its whole EP group
  through the all-to-all backward. Both are divided by the data-parallel degree (the loss is a mean over ranks).
Checkpoint state uses global names: `layers.3.mlp.experts.{global id}...` for weights and
`{global name}::{accumulator}` for optimizer state, so a checkpoint loads under any other EP / DP layout;
tensor-parallel shards are saved whole (gathered over the TP group) and cut again on load (`tp_state`).
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np
import paddle

from ernie5 import kernels
from ernie5.errors import UserError
from ernie5.parallel.topology import Topology
from ernie5.parallel.tp_state import gather_full, shard_of, sum_replicated_grad, unique_squares
from ernie5.optim.config import OptimConfig
from ernie5.optim.adamw import build_optimizer, scale_grads

_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts\.)(\d+)(\..*)$")


def global_names(model) -> dict[str, str]:
    """Structured local name -> global name (local expert index -> global expert id)."""
    out = {}
    for name in model.state_dict():  # parameters and persistable buffers: what a checkpoint holds
        m = _EXPERT.match(name)
        if m:
            layer = model.layers[int(name.split(".")[1])].mlp
            name_g = f"{m.group(1)}{layer.expert_ids[int(m.group(2))]}{m.group(3)}"
        else:
            name_g = name
        out[name] = name_g
    return out


def is_expert_name(name: str) -> bool:
    return bool(_EXPERT.match(name))


class ParallelRuntime:
    """Owns the optimizer(s) of a model under a topology: sync, norm, clip, step, state."""

    def __init__(self, model, cfg: OptimConfig, topo: Topology):
        self.topo, self.model = topo, model
        params = dict(model.named_parameters())
        self.to_global = global_names(model)
        sharded_experts = topo.ep > 1
        self.expert_params = [p for n, p in params.items() if sharded_experts and is_expert_name(n)]
        expert_ids = {id(p) for p in self.expert_params}
        self.dense_params = [p for p in params.values() if not p.stop_gradient and id(p) not in expert_ids]
        self.name_of = {p.name: n for n, p in params.items()}  # paddle var name -> structured local name
        self.tp = topo.tp
        self.shards = {n: shard_of(p) for n, p in params.items() if shard_of(p) is not None}
        self.local_shapes = {n: list(p.shape) for n, p in params.items()}
        trainable = [p for p in params.values() if not p.stop_gradient]
        self.sp_params = [p for p in trainable if getattr(p, "sequence_parallel", False)]
        self.kv_replicated = [p for p in trainable if shard_of(p) is not None
                              and shard_of(p)[0].shards < self.tp.degree]
        stage = getattr(model, "stage", None)
        both_ends = stage is not None and topo.embed_group is not None
        # parameters both the first and the last stage hold (the same list on both: the build rule of
        # `UnifiedModel`, the embedding there only with a tied head or MTP; names in model order)
        shared = ("io", "embed") if model.cfg.tie_embeddings or model.cfg.mtp.depth else ("io",)
        self.end_shared = [p for n, p in params.items() if both_ends and n.split(".")[0] in shared]
        second_copies = set() if stage is None or stage.first else {id(q) for q in self.end_shared}
        self.counts_here = lambda p: id(p) not in second_copies
        self.stage = stage
        self.dense_opt = build_optimizer(self.dense_params, cfg)
        self.sharded = None
        if topo.distributed and topo.sharding_stage == 1:
            from paddle.distributed import fleet

            self.sharded = fleet.distributed_optimizer(self.dense_opt)._inner_opt  # DygraphShardingOptimizer
        self.expert_opt = build_optimizer(self.expert_params, cfg) if self.expert_params else None

    @property
    def all_params(self) -> list:
        return self.dense_params + self.expert_params

    def _owned_dense(self) -> list:
        return self.sharded.filter_parameters(self.dense_params, self.topo.hcg) if self.sharded else self.dense_params

    # ---- per step ----------------------------------------------------------------------------------------
    @paddle.no_grad()
    def sync_grads(self) -> None:
        """Average gradients over the ranks that hold the same parameters.

        A parameter that produced no gradient on any rank of its group (a layer an elastic depth cut skipped,
        an expert no token reached, an unused modality head) keeps no gradient, as in one process, so AdamW
        skips it on every rank instead of applying momentum and weight decay. One that produced a gradient on
        some rank only gets zeros on the others, so every rank joins the same collectives.
        """
        topo = self.topo
        if not topo.distributed:
            return
        from paddle.distributed.fleet.utils.hybrid_parallel_util import (fused_allreduce_gradients,
                                                                           fused_allreduce_gradients_with_group)

        if self.end_shared:
            shared = self._with_grad_somewhere(self.end_shared, topo.embed_group)
            if shared:
                fused_allreduce_gradients_with_group(shared, topo.embed_group, scale=1.0)
        if self.tp.active:
            sp = self._with_grad_somewhere(self.sp_params, self.tp.group)
            if sp:
                fused_allreduce_gradients_with_group(sp, self.tp.group, scale=1.0)
            for p in self._with_grad_somewhere(self.kv_replicated, self.tp.group):
                sum_replicated_grad(p, shard_of(p)[0], self.tp)
        if topo.dp == 1:
            return
        dense = self._with_grad_somewhere(self.dense_params, topo.dp_group)
        experts = self._with_grad_somewhere(self.expert_params, topo.edp_group)
        if self.sharded is not None:
            self.sharded.reduce_gradients(dense, topo.hcg)
        else:
            fused_allreduce_gradients(dense, topo.hcg)
        if experts:
            if topo.edp_group is not None:
                fused_allreduce_gradients_with_group(experts, topo.edp_group, scale=1.0 / topo.dp)
            else:
                scale_grads(experts, 1.0 / topo.dp)

    def _with_grad_somewhere(self, params: list, group) -> list:
        """The parameters that have a gradient on at least one rank of `group` (all of its ranks agree), with
        zeros filled in where this rank has none; `group` None: this rank alone."""
        if not params:
            return []
        has = np.array([p.grad is not None for p in params], dtype=np.float64)
        if group is not None:
            has = self.topo.sum_array(has, group=group)
        out = []
        for p, h in zip(params, has):
            if h > 0:
                if p.grad is None:
                    p.grad = paddle.zeros_like(p)
                out.append(p)
        return out

    @paddle.no_grad()
    def grad_norm(self) -> float:
        """Global gradient norm after sync (the same number on every rank; NaN if any gradient is)."""
        def sq(ps):  # each grad's squared norm as a [1, n] x [n, 1] GEMM: multi-threaded BLAS, no temporary
            # (square + sum, single-threaded on CPU, was ~3x slower; the generic pow kernel ~8x slower again)
            gs = []
            for p in ps:
                if p.grad is not None:
                    g = p.grad if p.grad.dtype == paddle.float32 else p.grad.astype("float32")
                    gs.append(paddle.matmul(g.reshape([1, -1]), g.reshape([-1, 1])).reshape([]))
            return float(paddle.add_n(gs)) if gs else 0.0

        def sq_fused(ps):  # one multi-threaded kernel over all of them
            gs = [p.grad for p in ps if p.grad is not None]
            return kernels.ops().e5_sum_squares(gs).item() if gs else 0.0

        if kernels.usable(*[p.grad for p in self.all_params if p.grad is not None]):
            sq = sq_fused

        owned = [p for p in self._owned_dense() if self.counts_here(p)]  # a tied copy counts on the first stage
        if self.tp.active:  # a TP shard's square counts once per piece over the group; whole weights once
            pieces = [p for p in owned if shard_of(p) is not None]
            dense = unique_squares([(p, sq([p])) for p in pieces], self.tp) + \
                sq([p for p in owned if shard_of(p) is None])
        else:
            dense = sq(owned)
        if self.sharded is not None:
            dense = float(self.topo.sum_array(np.array([dense]))[0])
        experts = sq(self.expert_params)
        if self.expert_params and self.topo.ep_group is not None:
            experts = float(self.topo.sum_array(np.array([experts]), group=self.topo.ep_group)[0])
        total = dense + experts
        if self.topo.pipe is not None:  # every stage's layers
            total = float(self.topo.sum_array(np.array([total]), group=self.topo.pipe.group)[0])
        return float(np.sqrt(total))

    def clip(self, factor: float) -> None:
        """Scale this step's gradients by `factor`: folded into the optimizer step (`FusedAdamW.grad_scale`)."""
        for opt in self._optimizers():
            opt.grad_scale = factor

    def step(self, lr: float) -> None:
        for opt in self._optimizers():
            opt.set_lr(lr)
        try:
            with paddle.utils.unique_name.guard():  # accumulators get stable names on the first step
                (self.sharded or self.dense_opt).step()
                if self.expert_opt is not None:
                    self.expert_opt.step()
        finally:
            for opt in self._optimizers():
                opt.grad_scale = 1.0  # a clip factor never outlives its step (no gradients, an error)

    def clear_grad(self) -> None:
        # every parameter, not each optimizer's list: fleet's sharding optimizer narrows the wrapped optimizer's
        # list to the parameters this rank owns, which would leave the others' gradients to leak into the next step
        for p in self.all_params:
            p.clear_gradient(False)

    def _optimizers(self) -> list:
        return [o for o in (self.dense_opt, self.expert_opt) if o is not None]

    # ---- state -------------------------------------------------------------------------------------------
    def _writes_experts(self) -> bool:
        """Only the first replica of each expert slice writes it (the others hold identical copies); under TP
        the first TP rank's."""
        return self.topo.dp_rank < self.topo.ep and self.tp.rank == 0

    def _whole(self, local: str, value):
        """`value` (a weight or an accumulator of weight `local`) as the global tensor: TP shards are gathered
        (every rank of the TP group calls this for the same tensors in the same order)."""
        sh = self.shards.get(local)
        if sh is None or list(value.shape) != self.local_shapes[local]:
            return value
        return gather_full(value, sh[0], sh[1], self.tp)

    def model_state(self) -> dict:
        """This rank's share of the weights, under global names (dense on rank 0, experts by first replica);
        tensor-parallel shards gathered whole by the TP group of data rank 0."""
        out = {}
        for local, value in self.model.state_dict().items():
            expert = is_expert_name(local)
            if not expert and self.topo.dp_rank == 0:
                value = self._whole(local, value)
            if (expert and self._writes_experts()) or (not expert and self._writes_dense(local)):
                out[self.to_global[local]] = value
        return out

    def _writes_dense(self, local: str) -> bool:
        """Replicated weights are written by the first data / TP rank of each pipeline stage (the tied
        embedding's second copy, on the last stage, is not written)."""
        if self.topo.dp_rank != 0 or self.tp.rank != 0:
            return False
        return self.stage is None or self.stage.first or local.split(".")[0] not in ("embed", "io")

    def optimizer_state(self) -> dict:
        """This rank's optimizer accumulators as {global name::accumulator: tensor}."""
        out = {}
        writers = []  # (optimizer, whether this rank writes it); TP ranks of a writer join its gathers
        if self.topo.dp_rank == 0 or self.sharded is not None:
            writers.append((self.dense_opt if self.sharded is None else self.sharded, self.tp.rank == 0))
        if self.expert_opt is not None and self._writes_experts():
            writers.append((self.expert_opt, True))
        for opt, writes in writers:
            for key, value in opt.state_dict().items():
                split = self._split_key(key)
                if split is not None:
                    value = self._whole(split[0], value)
                    if writes and (self.stage is None or self.stage.first
                                   or split[0].split(".")[0] not in ("embed", "io")):
                        out[f"{self.to_global[split[0]]}::{split[1]}"] = value
        return out

    def _split_key(self, key: str) -> Optional[tuple[str, str]]:
        """'linear_3.w_0_moment1_0' -> ('layers.0.attn.q_proj.weight', 'moment1_0') (longest var-name prefix)."""
        best = None
        for var in self.name_of:
            if key.startswith(var + "_") and (best is None or len(var) > len(best)):
                best = var
        return None if best is None else (self.name_of[best], key[len(best) + 1:])

    def load_optimizer_state(self, state: dict) -> None:
        """Give each local optimizer the accumulators of its parameters (any source layout)."""
        from_global = {g: l for l, g in self.to_global.items()}
        by_opt: dict[int, dict] = {}
        params = dict(self.model.named_parameters())
        expert_ids = {id(p) for p in self.expert_params}
        for key, value in state.items():
            gname, acc = key.split("::", 1)
            local = from_global.get(gname)
            if local is None or local not in params:
                continue  # another rank's expert
            p = params[local]
            if local in self.shards and list(value.shape) == self.shards[local][1]:
                value = self.shards[local][0].take(value)
            opt = self.expert_opt if id(p) in expert_ids else (self.sharded or self.dense_opt)
            by_opt.setdefault(id(opt), {})[f"{p.name}_{acc}"] = value
        for opt in (self.sharded or self.dense_opt, self.expert_opt):
            if opt is not None and id(opt) in by_opt:
                # on a rollback the optimizer may hold accumulators the checkpoint predates (an expert first used
                # after it): paddle requires every existing one, so those keep their current values
                opt.set_state_dict({**opt.state_dict(), **by_opt[id(opt)]})

    def local_model_state(self, global_state: dict, where: str) -> dict:
        """The slice of a global state dict this rank's model holds, under its local names.

        The checkpoint must describe the same model: every global name this layout expects is there, and no
        name (expert ids included) that the config does not have.
        """
        E = self.model.cfg.moe.num_experts
        dense = {g for l, g in self.to_global.items() if not is_expert_name(l)}
        unexpected = [k for k in global_state
                      if (is_expert_name(k) and int(_EXPERT.match(k).group(2)) >= E)
                      or (not is_expert_name(k) and k not in dense and self.stage is None)]
        missing = [g for g in self.to_global.values() if g not in global_state]
        if missing or unexpected:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise UserError(where, f"checkpoint does not match the model config ({detail})")
        return {local: (self.shards[local][0].take(global_state[g]) if local in self.shards
                        else global_state[g]) for local, g in self.to_global.items()}
