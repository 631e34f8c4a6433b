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
