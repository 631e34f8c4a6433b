"""Build a model's layers without allocating their weights (paddle.LazyGuard) and check them against the plan.

Under `paddle.LazyGuard()` every `create_parameter` returns a parameter with its shape and dtype but no
storage (its initializer is deferred until `initialize()`, which we never call), so a trillion-parameter
UnifiedModel costs only the Python objects. The check attributes every built parameter to a plan component
by its name and compares the counts per component with `ernie5.plan.params`, and checks that no parameter got
storage.

Building every expert of a 512-expert x 58-layer model still means ~60k Python Linear objects (~14 s,
~0.8 GB of Python objects), so `full=False` builds one representative model instead: the same shapes with
one dense block (if the model has one) and one MoE block (if it has one), plus embeddings, head, MTP and the
modality inputs and heads; the whole model's counts follow from the per-layer-kind counts. Blocks depend only
on the config and their kind (`Block(cfg, moe)`), so this is the same shape check.

`check_layout_build` (`ernie5 plan CONFIG --check-build`) checks the layout instead of the whole model: it builds,
as the trainer does (`build_model(..., placement, tp, stage)`), the first and the last pipeline stage's shard
of every tensor rank and of expert rank 0, with the stage's whole layer set (virtual chunks dealt round robin,
`stage_layers`), and compares each shard's parameters and weight bytes, per component, with what
`ernie5.plan.memory` plans for that device. Bytes are numel x the dtype the runtime stores each built parameter
in: fp32 for the weights of the layers bf16 AMP keeps in fp32 (`_fp32_layer_types`: RMSNorm, Router), the
param dtype for every other parameter.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, field

from ernie5.model.config import ModelConfig
from ernie5.plan.params import ParamCount, count_parameters

# parameter name (UnifiedModel attribute paths) -> plan component; first match wins
_COMPONENTS = [
    (r"^embed\.", "embeddings"),
    (r"^lm_head\.", "lm_head"),
    (r"^mtp\.", "mtp"),
    (r"^norm\.", "norms"),
    (r"^layers\.\d+\.(input_norm|post_attn_norm)\.", "norms"),
    (r"^layers\.\d+\.attn\.", "attention"),
    (r"^layers\.\d+\.mlp\.(router|vision_router)\.", "router"),
    (r"^layers\.\d+\.mlp\.experts\.", "experts"),
    (r"^layers\.\d+\.mlp\.vision_experts\.", "vision_experts"),
    (r"^layers\.\d+\.mlp\.shared\.", "shared_experts"),
    (r"^layers\.\d+\.mlp\.(gate_up|down)\.", "dense_ffn"),
    (r"^io\.(vis_proj|scale_embed|audio_embed)\.", "modality_embeddings"),
    (r"^io\.merger\.", "patch_merger"),
    (r"^io\.visual_head\.", "visual_head"),
    (r"^io\.audio_heads\.", "audio_heads"),
]

# above this many routed-expert SwiGLUs the default check builds the representative model
FULL_BUILD_MAX_EXPERTS = 4096


def component_of(name: str) -> str:
    for pattern, component in _COMPONENTS:
        if re.match(pattern, name):
            return component
    raise ValueError(f"cannot attribute parameter {name!r} to a plan component (update ernie5.plan.lazy._COMPONENTS)")


@dataclass
class BuildCheck:
    """Counts per component from the lazily built model vs. the plan, and what the build cost."""

    mode: str  # "full" or "representative"
    built: dict[str, int] = field(default_factory=dict)
    planned: dict[str, int] = field(default_factory=dict)
    allocated: list[str] = field(default_factory=list)  # parameters that have storage (should be none)
    seconds: float = 0.0
    rss_growth_bytes: int = 0

    @property
    def ok(self) -> bool:
        keys = set(self.built) | {k for k, v in self.planned.items() if v}
        return not self.allocated and all(self.built.get(k, 0) == self.planned.get(k, 0) for k in keys)


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; elsewhere 0, and the RSS check is skipped)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _representative(cfg: ModelConfig) -> tuple[ModelConfig, dict[int, str]]:
    """Same shapes, layers cut to one of each kind present; returns the config and {layer index: kind}."""
    kinds = {cfg.is_moe_layer(i) for i in range(cfg.num_layers)}
    has_dense, has_moe = False in kinds, True in kinds
    # layer 0 dense (if any), then one MoE layer (if any)
    moe = dataclasses.replace(cfg.moe, num_experts=cfg.moe.num_experts if has_moe else 0,
                              layer_start=1 if has_dense else 0, layer_end=None, layer_interval=1)
    small = dataclasses.replace(cfg, num_layers=len(kinds), moe=moe)
    return small, {i: "moe" if small.is_moe_layer(i) else "dense" for i in range(small.num_layers)}


def check_buildable(cfg: ModelConfig, full: bool | None = None) -> BuildCheck:
    """Build `cfg` under paddle.LazyGuard and compare per-component counts with the plan (nothing allocated)."""
    import paddle

    from ernie5.model.transformer import build_model

    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    if full is None:
        full = moe_layers * cfg.moe.num_experts <= FULL_BUILD_MAX_EXPERTS
    target, kinds = (cfg, None) if full else _representative(cfg)
    rss0, t0 = _rss_bytes(), time.perf_counter()
    with paddle.LazyGuard():
        model = build_model(target)
    per_kind: dict[str, ParamCount] = {"dense": ParamCount(), "moe": ParamCount()}
    built = ParamCount()
    allocated = []
    for name, p in model.named_parameters():
        n = math.prod(p.shape)
        comp = component_of(name)
        if getattr(p, "_is_initialized", lambda: False)():
            allocated.append(name)
        layer = re.match(r"^layers\.(\d+)\.", name)
        if kinds is not None and layer:
            per_kind[kinds[int(layer.group(1))]].add(comp, n)
        else:
            built.add(comp, n)
    if kinds is not None:  # scale the one block of each kind up to the real layer counts
        for kind, count in (("dense", cfg.num_layers - moe_layers), ("moe", moe_layers)):
            for comp, n in per_kind[kind].total.items():
                built.add(comp, n * count)
    check = BuildCheck(mode="full" if full else "representative", built=dict(built.total),
                       planned=dict(count_parameters(cfg).total), allocated=allocated,
                       seconds=time.perf_counter() - t0, rss_growth_bytes=max(0, _rss_bytes() - rss0))
    del model
    return check


# ---- `ernie5 plan CONFIG --check-build`: the planned layout's shards, built lazily -----------------------------

def _fp32_layer_types() -> tuple:
    """The layers whose weights the runtime keeps in fp32 whatever the param dtype (Paddle AMP O2's
    `excluded_layers` in `ernie5.model.mixed_precision`); every other parameter is stored in param_dtype."""
    from ernie5.model.layers import RMSNorm
    from ernie5.model.moe import Router

    return (RMSNorm, Router)


@dataclass
class ShardCheck:
    """One device's shard (pipeline stage x tensor rank x expert rank): plan vs. lazily built model.
    `planned` / `built`: component -> [params, weight bytes]; `planned_params` / `planned_bytes`: the per-device
    figures `memory_plan` reports for the stage (what `ernie5 plan` prints)."""

    stage: int
    pipeline: int
    tensor_rank: int
    tensor: int
    expert_rank: int
    expert: int
    layers: list[int]
    planned_params: int
    planned_bytes: int
    planned: dict[str, list[int]] = field(default_factory=dict)
    built: dict[str, list[int]] = field(default_factory=dict)
    allocated: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def built_params(self) -> int:
        return sum(n for n, _ in self.built.values())

    @property
    def built_bytes(self) -> int:
        return sum(b for _, b in self.built.values())

    @property
    def name(self) -> str:
        from ernie5.plan.memory import _ranges

        return (f"stage {self.stage}/{self.pipeline} (layers {_ranges(self.layers)}) tensor rank "
                f"{self.tensor_rank}/{self.tensor} expert rank {self.expert_rank}/{self.expert}")

    def problem(self) -> str | None:
        """The first disagreement with the plan, as one sentence; None when the shard is exactly as planned."""
        if self.allocated:
            return (f"{self.name}: {len(self.allocated)} parameter(s) got storage under LazyGuard, "
                    f"e.g. {self.allocated[0]}")
        for comp in list(self.planned) + [c for c in self.built if c not in self.planned]:
            p, b = self.planned.get(comp, [0, 0]), self.built.get(comp, [0, 0])
            for i, what in ((0, "params"), (1, "bytes")):
                if p[i] != b[i]:
                    return f"{self.name}: {comp} {what} planned {p[i]:,} built {b[i]:,}"
        if (self.planned_params, self.planned_bytes) != (self.built_params, self.built_bytes):
            return (f"{self.name}: params planned {self.planned_params:,} built {self.built_params:,}, bytes planned "
                    f"{self.planned_bytes:,} built {self.built_bytes:,}")
        return None

    def line(self) -> str:
        return (f"{self.name}: params planned {self.planned_params:,} built {self.built_params:,}; bytes planned "
                f"{self.planned_bytes:,} built {self.built_bytes:,}; {self.seconds:.2f} s; "
                f"{'ok' if self.problem() is None else 'MISMATCH'}")

    def as_dict(self) -> dict:
        return {"stage": self.stage, "tensor_rank": self.tensor_rank, "expert_rank": self.expert_rank,
                "layers": self.layers, "planned_params": self.planned_params, "built_params": self.built_params,
                "planned_bytes": self.planned_bytes, "built_bytes": self.built_bytes, "planned": self.planned,
                "built": self.built, "allocated": self.allocated[:10], "seconds": self.seconds,
                "ok": self.problem() is None, "problem": self.problem()}


@dataclass
class LayoutBuildCheck:
    """Every checked shard of a layout; `rss_growth_bytes` over all the builds (the weights never get storage)."""

    shards: list[ShardCheck]
    param_dtype: str
    seconds: float
    rss_growth_bytes: int

    @property
    def ok(self) -> bool:
        return all(s.problem() is None for s in self.shards)

    def first_problem(self) -> str | None:
        return next((p for p in (s.problem() for s in self.shards) if p), None)

    def format(self) -> str:
        lines = [s.line() for s in self.shards]
        lines.append(f"{len(self.shards)} shard(s) built under paddle.LazyGuard in {self.seconds:.2f} s, RSS "
                     f"+{self.rss_growth_bytes / 1e6:.0f} MB; weight bytes at param dtype {self.param_dtype} (norms "
                     f"and routers fp32): {'all as planned' if self.ok else 'MISMATCH'}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "problem": self.first_problem(), "param_dtype": self.param_dtype,
                "seconds": self.seconds, "rss_growth_bytes": self.rss_growth_bytes,
                "shards": [s.as_dict() for s in self.shards]}


def _planned_shard(run_cfg, layers: list[int], first: bool, last: bool, param_dtype: str) -> dict[str, list[int]]:
    """The plan's per-device [params, weight bytes] by component, with `ernie5.plan.memory`'s own rules."""
    from ernie5.plan.memory import DTYPE_BYTES, _per_device, fp32_params, stage_params

    m, p = run_cfg.model, run_cfg.parallel
    out = {}
    for comp, count in stage_params(m, layers, first, last, p.pipeline, p.tensor).total.items():
        n = _per_device(comp, count, p.expert)
        if n:
            n32 = fp32_params(m, comp, n, p.tensor)
            out[comp] = [n, 4 * n32 + DTYPE_BYTES[param_dtype] * (n - n32)]
    return out


def _build_shard(run_cfg, stage, tensor_rank: int, expert_rank: int, param_dtype: str) -> tuple[dict, list[str]]:
    """Build one device's shard under LazyGuard as the trainer does; ({component: [params, bytes]}, allocated)."""
    import paddle

    from ernie5.comm.regions import TPGroup
    from ernie5.model.moe import ExpertPlacement
    from ernie5.model.transformer import build_model
    from ernie5.plan.memory import DTYPE_BYTES

    m, p = run_cfg.model, run_cfg.parallel
    E = m.moe.num_experts
    tp = TPGroup(p.tensor, tensor_rank, p.sequence_parallel_on, None) if p.tensor > 1 else None
    placement = None  # the dispatcher is not called while building
    if p.expert > 1 and E:
        per = E // p.expert  # as Topology.local_experts
        placement = ExpertPlacement(list(range(expert_rank * per, (expert_rank + 1) * per)), dispatcher=None)
    with paddle.LazyGuard(), paddle.utils.unique_name.guard():
        model = build_model(m, seed=run_cfg.run.seed, recompute=run_cfg.recompute, placement=placement,
                            fp8=run_cfg.precision.fp8, tp=tp, stage=stage)
    fp32 = {f"{prefix}.{n}" for prefix, layer in model.named_sublayers() if isinstance(layer, _fp32_layer_types())
            for n, _ in layer.named_parameters(include_sublayers=False)}
    built: dict[str, list[int]] = {}
    allocated = []
    for name, param in model.named_parameters():
        n = math.prod(param.shape)
        c = built.setdefault(component_of(name), [0, 0])
        c[0] += n
        c[1] += n * (4 if name in fp32 else DTYPE_BYTES[param_dtype])
        if param._is_initialized():
            allocated.append(name)
    return built, allocated


def check_layout_build(run_cfg, param_dtype: str = "bf16", devices: int | None = None,
                       tensor_ranks: list[int] | None = None,
                       expert_ranks: list[int] | None = None) -> LayoutBuildCheck:
    """Build, under paddle.LazyGuard, the first and the last pipeline stage's shard of every tensor rank (default)
    and of expert rank 0 (default) for `run_cfg`'s layout, and compare each with the plan: per-device parameters
    and weight bytes, per component and in total, must be equal. No weight gets storage."""
    from ernie5.errors import UserError
    from ernie5.model.pipeline import PipelineStage, stage_layers
    from ernie5.plan.layout import chunk_sizes
    from ernie5.plan.memory import check_layout, memory_plan, resolve_data

    if run_cfg.model.vocab_size is None:
        raise UserError("model.vocab_size", "must be set for `plan` (it is otherwise read from the data)")
    run_cfg, _ = resolve_data(run_cfg, devices)
    check_layout(run_cfg)
    m, p = run_cfg.model, run_cfg.parallel
    per_stage = memory_plan(run_cfg, param_dtype)["per_stage"]
    layout = stage_layers(m.num_layers, p.pipeline, p.virtual_pipeline, chunk_sizes(run_cfg))
    shards = []
    rss0, t0 = _rss_bytes(), time.perf_counter()
    for s in sorted({0, p.pipeline - 1}):
        # the stage's whole layer set, virtual chunks included (dealt round robin as the plan deals them)
        stage = PipelineStage(s, p.pipeline, tuple(layout[s]))
        planned = _planned_shard(run_cfg, layout[s], s == 0, s == p.pipeline - 1, param_dtype)
        for r in (range(p.tensor) if tensor_ranks is None else tensor_ranks):
            for e in (expert_ranks or [0]):
                t = time.perf_counter()
                built, allocated = _build_shard(run_cfg, stage, r, e, param_dtype)
                shards.append(ShardCheck(stage=s, pipeline=p.pipeline, tensor_rank=r, tensor=p.tensor, expert_rank=e,
                                         expert=p.expert, layers=list(layout[s]),
                                         planned_params=per_stage[s]["params"],
                                         planned_bytes=per_stage[s]["params_bytes"], planned=planned, built=built,
                                         allocated=allocated, seconds=time.perf_counter() - t))
    return LayoutBuildCheck(shards, param_dtype, time.perf_counter() - t0, max(0, _rss_bytes() - rss0))
