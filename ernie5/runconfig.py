"""The run config: one YAML file (+ optional `base:` include, + `key.path=value` overrides) -> RunConfig."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ernie5.config.schema import build, require, to_dict
from ernie5.config.yaml_io import apply_overrides, load_yaml
from ernie5.data.config import DataConfig
from ernie5.elastic.config import ElasticConfig
from ernie5.elastic.space import check_elastic
from ernie5.model.config import ModelConfig
from ernie5.objectives.config import ObjectiveConfig
from ernie5.modality.text_tokenizer import TextTokenizerConfig
from ernie5.parallel.config import ParallelConfig, check_tensor_parallel
from ernie5.precision.config import PrecisionConfig, RecomputeConfig
from ernie5.optim.config import OptimConfig
from ernie5.train.config import CheckpointConfig, FaultsConfig, TrainConfig


@dataclass
class RunSection:
    """Where outputs go and the seed everything derives from."""

    output_dir: str = "runs/default"
    seed: int = 0
    name: str = ""
    deterministic: bool = False  # GPU: require deterministic cuDNN / embedding kernels (CPU runs are always)


@dataclass
class RunConfig:
    kind: Literal["run"] = "run"  # what the file is (see config_kind); may be left out of a run config
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # unified (multimodal) runs only

    def validate(self, path: str) -> None:
        require(self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
                f"{self.data.seq_len} > model.max_seq_len {self.model.max_seq_len}")
        experts = self.model.moe.num_experts
        require(experts == 0 or experts % self.parallel.expert == 0, "parallel.expert",
                f"{self.parallel.expert} does not divide model.moe.num_experts {experts}")
        check_elastic(self.elastic, self.model, self.parallel, "elastic")
        check_tensor_parallel(self.parallel, self.model, self.data.seq_len)
        P = self.parallel.pipeline
        if P > 1:
            require(self.train.grad_accum_steps >= P, "train.grad_accum_steps",
                    f"{self.train.grad_accum_steps} < parallel.pipeline {P} (1F1B needs a micro-batch per stage)")
            V = self.parallel.virtual_pipeline
            require(self.model.num_layers >= P * V, "parallel.pipeline",
                    f"{P} stages x virtual_pipeline {V} = {P * V} chunks > model.num_layers {self.model.num_layers}")
            lay = self.parallel.pipeline_layout
            require(lay is None or (len(lay) == P * V and sum(lay) == self.model.num_layers and min(lay) >= 1),
                    "parallel.pipeline_layout", f"{lay} must be {P * V} layer counts (pipeline x virtual_pipeline), "
                                                f"each >= 1, summing to model.num_layers {self.model.num_layers}")
            require(V == 1 or self.train.grad_accum_steps % P == 0, "train.grad_accum_steps",
                    f"{self.train.grad_accum_steps} is not a multiple of parallel.pipeline {P} (interleaved 1F1B "
                    "runs the micro-batches in groups of one per stage)")
        if self.model.moe.isolated:
            require(self.parallel.expert == 1, "parallel.expert", "isolated routing runs without expert parallelism")
            require(not self.elastic.enabled, "elastic.enabled", "elastic sub-models need agnostic routing")
        if self.recompute.layers is not None:
            bad = [i for i in self.recompute.layers if i >= self.model.num_layers]
            require(not bad, "recompute.layers", f"{bad} past the last layer ({self.model.num_layers - 1})")

    def to_yaml(self) -> str:
        return yaml.safe_dump(to_dict(self), sort_keys=False, allow_unicode=True)


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """Load, merge and validate. Raises UserError/ConfigError with the file or dotted key path named."""
    raw = load_yaml(Path(path)) if path is not None else {}
    return build(RunConfig, apply_overrides(raw, list(overrides)), "")


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    return build(RunConfig, raw, "")


__all__ = ["RunConfig", "RunSection", "load_config", "config_from_dict", "apply_overrides"]
