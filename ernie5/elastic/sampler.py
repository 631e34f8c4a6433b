"""Per-micro-step sub-model sampler: reproducible, identical on every rank, resumable.

The draw for (step, micro-step) comes from a generator seeded with (seed, step, micro-step) alone, so every rank
computes the same sub-model without communication, a resumed or rolled-back run redraws exactly what the
uninterrupted run drew, and no generator state has to be carried between steps. The checkpointed state holds
the seed actually used (so a resume keeps the sequence even if the config's seed changed) and draw counts per
kind (for logs). The sampler also collects the per-kind losses of the current step for the metrics.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ernie5.elastic.config import ElasticConfig
from ernie5.elastic.space import ElasticSpace
from ernie5.elastic.submodel import FULL, SubModel
from ernie5.model.config import ModelConfig


class ElasticSampler:
    """Draws the sub-model of each micro-step; `full_model_steps` first steps are the full model only."""

    def __init__(self, cfg: ElasticConfig, model: ModelConfig, ep: int = 1, run_seed: int = 0):
        self.cfg = cfg
        self.space = ElasticSpace(cfg, model, ep)
        self.seed = cfg.seed if cfg.seed is not None else run_seed
        self.kind_counts: dict[str, int] = {}
        self._step: list[tuple[SubModel, Optional[float]]] = []

    def submodel_at(self, step: int, micro: int) -> SubModel:
        """The sub-model of micro-step `micro` of optimizer step `step` (1-based): a pure function."""
        if step <= self.cfg.full_model_steps:
            return FULL
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, step, micro]))
        return self.space.sample(rng)

    def sample(self, step: int, micro: int) -> SubModel:
        """`submodel_at`, counted and remembered for this step's metrics."""
        sub = self.submodel_at(step, micro)
        self.kind_counts[sub.kind] = self.kind_counts.get(sub.kind, 0) + 1
        self._step.append((sub, None))
        return sub

    def record_loss(self, value: float) -> None:
        """The loss of the micro-step drawn last."""
        sub, _ = self._step[-1]
        self._step[-1] = (sub, value)

    def step_metrics(self) -> dict:
        """Which sub-models the step trained and the mean loss per kind (`loss_full`, `loss_sub`,
        `loss_<kind>`); clears the step's record."""
        s = self.space
        out: dict = {"elastic_kind": ",".join(sub.kind for sub, _ in self._step),
                     "elastic_submodels": [sub.describe(s.L, s.E, s.K) for sub, _ in self._step]}
        by_kind: dict[str, list[float]] = {}
        for sub, value in self._step:
            if value is not None:
                by_kind.setdefault(sub.kind, []).append(value)
                if sub.kind != "full":
                    by_kind.setdefault("sub", []).append(value)
        out.update({f"loss_{kind}": float(np.mean(v)) for kind, v in by_kind.items()})
        self._step = []
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "kind_counts": dict(self.kind_counts)}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.kind_counts = {k: int(v) for k, v in state.get("kind_counts", {}).items()}
        self._step = []


def build_sampler(run_cfg) -> Optional[ElasticSampler]:
    """The run's sampler, or None when `elastic.enabled` is false."""
    e = run_cfg.elastic
    if not e.enabled:
        return None
    return ElasticSampler(e, run_cfg.model, run_cfg.parallel.expert, run_cfg.run.seed)
