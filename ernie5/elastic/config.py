"""The `elastic:` config section (paddle-free): which sub-models one run trains, and how often.

Each dimension is sampled independently per micro-step: with probability `p_full` it stays as in the full model,
otherwise it is cut. Defaults follow ERNIE 5.0 (full depth / all experts / default k each with p = 0.8).
Rules that need the model (a subset larger than the experts, k above a subset size, ...) are checked by
`ernie5.elastic.space.check_elastic`, called from `RunConfig.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ernie5.config.schema import join, require


def _check_p(value: float, path: str) -> None:
    require(0.0 <= value <= 1.0, path, f"{value} must be a probability in [0, 1]")


@dataclass
class DepthConfig:
    """Layer dropping: the first `keep_first` and last `keep_last` layers always run; the layers between are cut
    into groups of `group_size` that are dropped together. A cut keeps each group with `retain_prob` (at least
    one group is dropped), or, when `depths` is set, draws the depth from that list and drops random groups."""

    p_full: float = 0.8
    keep_first: int = 1
    keep_last: int = 1
    group_size: int = 1
    retain_prob: float = 0.5
    depths: Optional[list[int]] = None  # candidate depths (numbers of layers) instead of retain_prob

    def validate(self, path: str) -> None:
        _check_p(self.p_full, join(path, "p_full"))
        require(self.keep_first >= 0, join(path, "keep_first"), "must be >= 0")
        require(self.keep_last >= 0, join(path, "keep_last"), "must be >= 0")
        require(self.group_size >= 1, join(path, "group_size"), "must be >= 1")
        require(0.0 <= self.retain_prob < 1.0, join(path, "retain_prob"),
                f"{self.retain_prob} must be in [0, 1) (1 would never drop a layer)")
        if self.depths is not None:
            require(len(self.depths) > 0, join(path, "depths"), "must list at least one depth (or be null)")


@dataclass
class WidthConfig:
    """Expert subsets: with probability 1 - p_full routing is restricted to a random subset whose size is drawn
    from `sizes`; under expert parallelism the subset holds the same number of experts on every EP rank."""

    p_full: float = 0.8
    sizes: Optional[list[int]] = None  # candidate subset sizes; null: half the experts

    def validate(self, path: str) -> None:
        _check_p(self.p_full, join(path, "p_full"))
        if self.sizes is not None:
            require(len(self.sizes) > 0, join(path, "sizes"), "must list at least one size (or be null)")


@dataclass
class SparsityConfig:
    """Reduced top-k: with probability 1 - p_full, k is drawn uniformly from [k_min, k_max]."""

    p_full: float = 0.8
    k_min: int = 1
    k_max: Optional[int] = None  # null: model.moe.top_k - 1

    def validate(self, path: str) -> None:
        _check_p(self.p_full, join(path, "p_full"))
        require(self.k_min >= 1, join(path, "k_min"), f"{self.k_min} must be >= 1")
        if self.k_max is not None:
            require(self.k_max >= self.k_min, join(path, "k_max"), f"{self.k_max} < k_min {self.k_min}")


@dataclass
class ElasticConfig:
    """Elastic training: one run trains the full model and a family of sub-models (depth, experts, top-k)."""

    enabled: bool = False
    seed: Optional[int] = None  # null: run.seed; draws depend only on (seed, step, micro-step): ranks agree
    full_model_steps: int = 0  # schedule: the first N optimizer steps train the full model only
    depth: DepthConfig = field(default_factory=DepthConfig)
    width: WidthConfig = field(default_factory=WidthConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)

    def validate(self, path: str) -> None:
        require(self.full_model_steps >= 0, join(path, "full_model_steps"), "must be >= 0")
