"""The elastic space of one model: which layers can be dropped, which expert subsets and k values exist.

Built from the `elastic:` config, the model config and the EP degree; construction checks that every configured
choice is realisable and raises ConfigError naming the dotted key otherwise. It draws random sub-models (for the
sampler) and canonical ones (for evaluation and export: the same sub-model every time a size is asked for).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from ernie5.config.schema import join, require
from ernie5.elastic.config import ElasticConfig
from ernie5.elastic.submodel import FULL, SubModel
from ernie5.model.config import ModelConfig

Choice = Union[int, Sequence[int], None]  # a count (canonical choice) or explicit indices


class ElasticSpace:
    """Resolved choices per dimension; `active` lists the dimensions that are ever cut (p_full < 1)."""

    def __init__(self, cfg: ElasticConfig, model: ModelConfig, ep: int = 1, path: str = "elastic"):
        self.cfg, self.ep = cfg, ep
        self.L, self.E, self.K = model.num_layers, model.moe.num_experts, model.moe.top_k
        d, w, s = cfg.depth, cfg.width, cfg.sparsity
        self.active = tuple(name for name, p in (("depth", d.p_full), ("width", w.p_full), ("topk", s.p_full))
                            if p < 1.0)
        self.groups = self._groups(join(path, "depth"))
        self.depths = self._depths(join(path, "depth"))
        self.sizes = self._sizes(join(path, "width"))
        self.ks = self._ks(join(path, "sparsity"))

    # ---- resolution and checks ---------------------------------------------------------------------------
    def _groups(self, path: str) -> list[tuple[int, ...]]:
        d = self.cfg.depth
        droppable = list(range(d.keep_first, self.L - d.keep_last))
        if "depth" not in self.active:
            return []
        require(len(droppable) > 0, join(path, "keep_first"),
                f"keep_first {d.keep_first} + keep_last {d.keep_last} leave no layer to drop in "
                f"model.num_layers {self.L}")
        require(len(droppable) % d.group_size == 0, join(path, "group_size"),
                f"{d.group_size} does not divide the {len(droppable)} droppable layers")
        return [tuple(droppable[i:i + d.group_size]) for i in range(0, len(droppable), d.group_size)]

    def _depths(self, path: str) -> list[int]:
        if "depth" not in self.active:
            return []
        g, n = self.cfg.depth.group_size, len(self.groups)
        allowed = [self.L - j * g for j in range(1, n + 1)]
        if self.cfg.depth.depths is None:
            return sorted(allowed)
        for i, depth in enumerate(self.cfg.depth.depths):
            require(depth in allowed, f"{join(path, 'depths')}[{i}]",
                    f"{depth} is not a reachable sub-model depth (reachable by dropping groups of {g}: "
                    f"{sorted(allowed)})")
        return sorted(set(self.cfg.depth.depths))

    def _sizes(self, path: str) -> list[int]:
        if "width" not in self.active:
            return []
        require(self.E > 0, join(path, "p_full"), "the model has no experts (model.moe.num_experts 0); set 1.0")
        sizes = self.cfg.width.sizes if self.cfg.width.sizes is not None else [self.E // 2]
        where = join(path, "sizes")
        for i, size in enumerate(sizes):
            at = f"{where}[{i}]" if self.cfg.width.sizes is not None else where
            require(1 <= size < self.E, at, f"{size} must be in [1, model.moe.num_experts {self.E})")
            require(size % self.ep == 0, at, f"{size} is not divisible by parallel.expert {self.ep} "
                                             "(subsets hold the same number of experts on every EP rank)")
            require(size >= self.K, at, f"{size} < model.moe.top_k {self.K} (the default k must fit the subset)")
        return sorted(set(sizes))

    def _ks(self, path: str) -> list[int]:
        if "topk" not in self.active:
            return []
        s = self.cfg.sparsity
        require(self.E > 0, join(path, "p_full"), "the model has no experts (model.moe.num_experts 0); set 1.0")
        require(self.K >= 2, join(path, "p_full"), f"model.moe.top_k {self.K} leaves no smaller k; set 1.0")
        k_max = self.K - 1 if s.k_max is None else s.k_max
        require(k_max < self.K, join(path, "k_max"), f"{k_max} must be below model.moe.top_k {self.K}")
        require(s.k_min <= k_max, join(path, "k_min"), f"{s.k_min} > k_max {k_max}")
        return list(range(s.k_min, k_max + 1))

    # ---- building sub-models ------------------------------------------------------------------------------
    def layers_for(self, depth: Choice, rng: Optional[np.random.Generator] = None) -> Optional[tuple[int, ...]]:
        """Kept layers for a depth (count -> evenly spaced dropped groups, or random ones given `rng`)."""
        if depth is None:
            return None
        if not isinstance(depth, int):
            return tuple(sorted(int(i) for i in depth))
        if depth >= self.L:
            return None
        groups = self.groups or self._all_groups()
        g = len(groups[0]) if groups else self.cfg.depth.group_size
        n_drop = (self.L - depth) // g
        if not (0 < n_drop <= len(groups)) or (self.L - depth) % g:
            raise ValueError(f"depth {depth} is not reachable by dropping groups of {g} layers from the "
                             f"{len(groups)} droppable groups (elastic.depth keeps the first/last layers)")
        if rng is None:  # evenly spaced, so a canonical cut does not favour the top or bottom of the stack
            drop = {round((i + 0.5) * len(groups) / n_drop - 0.5) for i in range(n_drop)}
        else:
            drop = set(rng.choice(len(groups), n_drop, replace=False).tolist())
        dropped = {layer for j in drop for layer in groups[j]}
        return tuple(i for i in range(self.L) if i not in dropped)

    def _all_groups(self) -> list[tuple[int, ...]]:
        """Droppable groups even when depth is not an active dimension (for explicit export requests)."""
        d = self.cfg.depth
        droppable = list(range(d.keep_first, self.L - d.keep_last))
        return [tuple(droppable[i:i + d.group_size]) for i in range(0, len(droppable), d.group_size)
                if len(droppable[i:i + d.group_size]) == d.group_size]

    def experts_for(self, size: Choice, rng: Optional[np.random.Generator] = None) -> Optional[tuple[int, ...]]:
        """Kept experts: `size / ep` from each EP rank's contiguous block (the first ones, or random with `rng`)."""
        if size is None:
            return None
        if not isinstance(size, int):
            return tuple(sorted(int(e) for e in size))
        if size >= self.E:
            return None
        per_rank, block = size // self.ep, self.E // self.ep
        if size % self.ep or size < 1:
            raise ValueError(f"{size} experts cannot be split evenly over {self.ep} EP ranks")
        kept = []
        for r in range(self.ep):
            picks = range(per_rank) if rng is None else sorted(rng.choice(block, per_rank, replace=False).tolist())
            kept.extend(r * block + j for j in picks)
        return tuple(kept)

    def canonical(self, depth: Choice = None, experts: Choice = None, top_k: Optional[int] = None) -> SubModel:
        """The sub-model evaluation and export mean by these sizes (deterministic)."""
        sub = SubModel(self.layers_for(depth), self.experts_for(experts), top_k)
        return sub.normalized(self.L, self.E, self.K)

    def sample(self, rng: np.random.Generator) -> SubModel:
        """One random sub-model. Always draws the three uniforms first, so the draw order is fixed."""
        u_depth, u_width, u_k = rng.random(3)
        c = self.cfg
        layers = experts = k = None
        if u_depth >= c.depth.p_full and self.groups:
            layers = self._sample_layers(rng)
        if u_width >= c.width.p_full and self.sizes:
            experts = self.experts_for(int(rng.choice(self.sizes)), rng)
        if u_k >= c.sparsity.p_full and self.ks:
            k = int(rng.choice(self.ks))
        return SubModel(layers, experts, k).normalized(self.L, self.E, self.K)

    def _sample_layers(self, rng: np.random.Generator) -> tuple[int, ...]:
        d = self.cfg.depth
        if d.depths is not None:
            return self.layers_for(int(rng.choice(self.depths)), rng)
        n = len(self.groups)
        for _ in range(100):  # a cut drops at least one group: resample an all-retained draw
            keep = rng.random(n) < d.retain_prob
            if not keep.all():
                break
        else:
            keep = np.ones(n, dtype=bool)
            keep[rng.integers(n)] = False
        dropped = {layer for j in range(n) if not keep[j] for layer in self.groups[j]}
        return tuple(i for i in range(self.L) if i not in dropped)

    def grid(self) -> list[tuple[str, SubModel]]:
        """Full model, each single-dimension cut, and the smallest combined cut (named rows for `eval`)."""
        rows = [("full", FULL)]
        rows += [(f"depth={d}", self.canonical(depth=d)) for d in sorted(self.depths, reverse=True)]
        rows += [(f"experts={s}", self.canonical(experts=s)) for s in sorted(self.sizes, reverse=True)]
        rows += [(f"top_k={k}", self.canonical(top_k=k)) for k in sorted(self.ks, reverse=True)]
        smallest = {"depth": min(self.depths, default=None), "experts": min(self.sizes, default=None),
                    "top_k": min(self.ks, default=None)}
        cut = {k: v for k, v in smallest.items() if v is not None}
        if len(cut) > 1:
            rows.append((",".join(f"{k}={v}" for k, v in cut.items()), self.canonical(**cut)))
        return rows


def check_elastic(cfg: ElasticConfig, model: ModelConfig, parallel, path: str = "elastic") -> None:
    """Cross-section rules (only when enabled): the space must be realisable for this model and EP degree.
    Raises ConfigError naming the dotted key."""
    if not cfg.enabled:
        return
    require(parallel.pipeline == 1 or cfg.depth.p_full == 1.0, join(path, "depth.p_full"),
            "elastic depth with pipeline parallelism (stage-balanced dropping) is not supported yet; set it to 1.0")
    ElasticSpace(cfg, model, parallel.expert, path)
