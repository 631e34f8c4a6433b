"""Cut a sub-model out of a trained model as a standalone, smaller model (config + weights).

The result computes exactly what the full model computes with `submodel=...`: kept layers renumbered in order,
kept experts renumbered in order with their router columns, k set to the sub-model's k. One subtlety is the
aux-free bias: a sub-model whose experts or k differ from the full model was trained selecting experts without
it (the router ignores the bias when it routes a sub-model, `ernie5.model.moe`), so its export carries a zero
bias (the kept entries of a depth-only cut are copied as they are).
"""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from typing import Optional

import numpy as np

from ernie5.elastic.config import ElasticConfig
from ernie5.elastic.space import ElasticSpace
from ernie5.elastic.submodel import SubModel
from ernie5.errors import UserError
from ernie5.model.config import ModelConfig

SPEC_KEYS = ("depth", "experts", "top_k")
_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(.*)$")


def parse_submodel_spec(text: str) -> dict:
    """`depth=3,experts=4,top_k=1` -> {"depth": 3, ...}; a value is a count or `+`-joined indices (`0+1+3`)."""
    out: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in SPEC_KEYS:
            raise UserError("--submodel", f"{item!r}: expected key=value with key one of {', '.join(SPEC_KEYS)}")
        try:
            parts = [int(v) for v in value.split("+")]
        except ValueError:
            raise UserError("--submodel", f"{item!r}: value must be a number or indices joined by '+'") from None
        if key == "top_k" and len(parts) != 1:
            raise UserError("--submodel", f"{item!r}: top_k is a single number")
        out[key] = parts[0] if len(parts) == 1 else parts
    if not out:
        raise UserError("--submodel", "empty; e.g. depth=3,experts=4,top_k=1")
    return out


def resolve_submodel(model: ModelConfig, elastic: ElasticConfig, ep: int, spec: dict) -> SubModel:
    """The SubModel a parsed spec names: counts become the canonical choice (as `eval --elastic` uses)."""
    L, E, K = model.num_layers, model.moe.num_experts, model.moe.top_k
    depth, experts, k = spec.get("depth"), spec.get("experts"), spec.get("top_k")
    _check_indices("depth", depth, L, "model.num_layers")
    if experts is not None:
        if E == 0:
            raise UserError("--submodel", "experts=: the model has no experts")
        _check_indices("experts", experts, E, "model.moe.num_experts")
        if isinstance(experts, int):
            balanced = experts % ep == 0
        else:  # rank r holds experts [r*E/ep, (r+1)*E/ep)
            balanced = len(set(np.bincount(np.asarray(experts) // (E // ep), minlength=ep).tolist())) == 1
        if not balanced:
            raise UserError("--submodel", f"experts={experts}: subsets must hold the same number of experts on each "
                                          f"of the parallel.expert={ep} ranks")
    n_experts = E if experts is None else (experts if isinstance(experts, int) else len(experts))
    if k is not None and not 1 <= k <= min(K, n_experts):
        raise UserError("--submodel", f"top_k={k}: must be in [1, {min(K, n_experts)}] (model top_k {K}, "
                                      f"{n_experts} experts kept)")
    # canonical choices only need the depth groups and EP blocks: no dimension has to be active for that
    frozen = replace(elastic, depth=replace(elastic.depth, p_full=1.0), width=replace(elastic.width, p_full=1.0),
                     sparsity=replace(elastic.sparsity, p_full=1.0))
    space = ElasticSpace(frozen, model, ep)
    try:
        return space.canonical(depth, experts, k)
    except ValueError as e:
        raise UserError("--submodel", str(e)) from None


def _check_indices(key: str, value, n: int, what: str) -> None:
    if value is None:
        return
    if isinstance(value, int):
        if not 1 <= value <= n:
            raise UserError("--submodel", f"{key}={value}: must be in [1, {what} {n}]")
        return
    if len(set(value)) != len(value) or not all(0 <= i < n for i in value):
        raise UserError("--submodel", f"{key}={'+'.join(map(str, value))}: indices must be distinct and in "
                                      f"[0, {n - 1}]")


def _moe_pattern(moe_flags: list[bool]) -> Optional[tuple[int, Optional[int], int]]:
    """(layer_start, layer_end, layer_interval) reproducing `moe_flags`, or None if no such rule exists."""
    idx = [i for i, f in enumerate(moe_flags) if f]
    n = len(moe_flags)
    start, end = idx[0], idx[-1]
    for interval in range(1, n + 1):
        if all(((start <= i <= end) and (i + 1) % interval == 0) == f for i, f in enumerate(moe_flags)):
            return start, (None if end == n - 1 else end), interval
    return None


def submodel_config(model: ModelConfig, sub: SubModel, for_counting: bool = False) -> ModelConfig:
    """The ModelConfig of the standalone sub-model (also what its active / total parameters are counted on).

    `for_counting`: where the kept MoE layers fit no start/end/interval rule, put them last instead of failing
    (parameter counts depend only on how many layers are MoE)."""
    layers = list(sub.layers) if sub.layers is not None else list(range(model.num_layers))
    cfg = copy.deepcopy(model)
    cfg.num_layers = len(layers)
    if model.moe.num_experts == 0:
        return cfg
    flags = [model.is_moe_layer(i) for i in layers]
    if not any(flags):  # every MoE layer dropped: a dense model
        cfg.moe = replace(cfg.moe, num_experts=0, layer_start=0, layer_end=None, layer_interval=1)
        return cfg
    pattern = _moe_pattern(flags)
    if pattern is None and for_counting:
        pattern = (len(flags) - sum(flags), None, 1)
    if pattern is None:
        kept_moe = [i for i in layers if model.is_moe_layer(i)]
        raise UserError("--submodel", f"kept layers {layers} (MoE: {kept_moe}) break the layer_start / layer_end / "
                                      "layer_interval rule of MoE layers; drop whole groups of "
                                      f"{model.moe.layer_interval} layers")
    cfg.moe.layer_start, cfg.moe.layer_end, cfg.moe.layer_interval = pattern
    if sub.experts is not None:
        cfg.moe.num_experts = len(sub.experts)
    if sub.top_k is not None:
        cfg.moe.top_k = sub.top_k
    return cfg


def submodel_state(state: dict[str, np.ndarray], model: ModelConfig, sub: SubModel) -> dict[str, np.ndarray]:
    """The full model's state dict (numpy, our names) cut down to the sub-model, renumbered."""
    layers = list(sub.layers) if sub.layers is not None else list(range(model.num_layers))
    new_layer = {old: new for new, old in enumerate(layers)}
    experts = list(sub.experts) if sub.experts is not None else list(range(model.moe.num_experts))
    new_expert = {old: new for new, old in enumerate(experts)}
    zero_bias = not sub.routing_is_full
    out = {}
    for name, value in state.items():
        m = _LAYER.match(name)
        if m is None:  # embeddings, final norm, head, MTP blocks: shared by every sub-model
            out[name] = value
            continue
        old, rest = int(m.group(1)), m.group(2)
        if old not in new_layer:
            continue
        e = _EXPERT.match(rest)
        if e is not None:
            if int(e.group(1)) not in new_expert:
                continue
            rest = f"mlp.experts.{new_expert[int(e.group(1))]}.{e.group(2)}"
        elif rest == "mlp.router.weight":
            value = value[:, experts]  # [H, E] -> [H, E_kept]
        elif rest == "mlp.router.e_score_correction_bias":
            value = np.zeros(len(experts), value.dtype) if zero_bias else value[experts]
        out[f"layers.{new_layer[old]}.{rest}"] = np.ascontiguousarray(value)
    return out


def extract(cfg, state: dict[str, np.ndarray], sub: SubModel):
    """(RunConfig, state) of the standalone sub-model; the elastic section is reset (its space no longer fits)."""
    new = copy.deepcopy(cfg)
    new.model = submodel_config(cfg.model, sub)
    new.elastic = ElasticConfig()
    if new.recompute.layers is not None and sub.layers is not None:
        keep = {old: i for i, old in enumerate(sub.layers)}
        new.recompute.layers = [keep[i] for i in new.recompute.layers if i in keep]
    return new, submodel_state(state, cfg.model, sub)
