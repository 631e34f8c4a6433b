"""What a workload contributes to the training loop: its data, the loss of a micro-batch, the held-out loss,
FLOPs per token, and the state it carries across steps.

A task is built from the resolved run config. The loop (`ernie5.train.trainer.Trainer`) only calls the methods
below, so a new workload is a new task class, not a branch in the loop:

- `train_loader` (resumable: `position`, `state_dict`; blends the sources of `data.sources`) and
  `val_loaders` (source name -> held-out loader);
- `batch(loader, train)`: the next micro-batch of `loader` as tensors;
- `loss(model, batch, submodel)`: an object with `.total` (the tensor to differentiate) and `.terms`
  (floats to log);
- `eval_losses(model, batches)`: the held-out loss per source and overall (None without held-out data), from
  the task's `held_out_term` of each micro-batch; `data_metrics()`: tokens seen per source;
- `finish_step(applied, sum_fn)`: end-of-step bookkeeping (`applied` False on a skipped step; `sum_fn`
  sums an array over the data-parallel ranks and the pipeline stages);
- `stateful()`: name -> object with `state_dict` / `load_state_dict`, saved in the checkpoint.

FLOPs per token are the planner's (a text token's for every workload: see `ernie5.plan.params`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import numpy as np

from ernie5.constants import MODALITY_TERMS
from ernie5.data.blend import BlendedLoader, source_seed
from ernie5.data.loader import PackedLoader, SyntheticLoader
from ernie5.data.shards import open_split
from ernie5.model.transformer import to_tensor_batch
from ernie5.objectives.text import make_text_batch, text_backbone, text_heads, text_loss
from ernie5.objectives.unified import UnifiedObjective
from ernie5.runconfig import RunConfig
from ernie5.train.unified_data import UnifiedBatches


class _Task(ABC):
    train_loader = None
    val_loaders: dict = {}  # source name -> held-out loader (sources without held-out rows are absent)
    weights: dict = {}  # source name -> its normalised mixture weight

    def eval_losses(self, model, batches: int, mean_of=None) -> Optional[dict]:
        """{"val_loss": overall, "val_loss/<source>": ...} over the first `batches` held-out micro-batches of
        each source (the same batches every time, so evaluations compare); None without held-out data. The
        overall loss weighs the sources by the mixture (`overall_val_loss`). `mean_of(batches)`: the mean held-out
        value of a list of batches (default: `held_out_term` of each, one process)."""
        if not self.val_loaders:
            return None
        if mean_of is None:
            def mean_of(bs):
                return float(np.mean([self.held_out_term(model, b) for b in bs]))
        per = {}
        for name, loader in self.val_loaders.items():
            loader.position = 0
            per[name] = mean_of([self.batch(loader, train=False) for _ in range(batches)])
        return {"val_loss": overall_val_loss(per, self.weights),
                **{f"val_loss/{name}": value for name, value in per.items()}}

    def data_metrics(self) -> dict:
        """Tokens drawn from each source so far (over all ranks): rows x seq_len, padding included."""
        S = self.cfg.data.seq_len
        return {f"tokens_seen/{name}": rows * S for name, rows in self.train_loader.rows_seen().items()}

    @abstractmethod
    def held_out_term(self, model, batch: dict) -> float:
        """The number one held-out micro-batch contributes to `eval_loss`."""

    def finish_step(self, applied: bool, sum_fn) -> None:
        pass

    def stateful(self) -> dict:
        return {}


class TextTask(_Task):
    """Next-token (+ MTP) prediction on packed text rows blended from the sources, or synthetic tokens
    (`data.synthetic`)."""

    def __init__(self, cfg: RunConfig, rank: int, world: int, notice=None):
        cfg.objective.check_text_only("objective")
        self.cfg = cfg
        self._loaders(rank, world, notice)
        # token-balanced loss: C tokens per row (0: plain masked means)
        self.balance_length = (cfg.objective.token_balance_length or cfg.data.seq_len) \
            if cfg.objective.token_balanced else 0

    def _loaders(self, rank: int, world: int, notice) -> None:
        d, t, seed = self.cfg.data, self.cfg.train, self.cfg.run.seed
        if d.synthetic:
            V = self.cfg.model.vocab_size
            self.train_loader = SyntheticLoader(V, d.seq_len, t.micro_batch_size, seed, rank, world)
            self.val_loaders, self.weights = {"synthetic": SyntheticLoader(V, d.seq_len, t.micro_batch_size,
                                                                           seed + 1)}, {"synthetic": 1.0}
            return
        sources = d.resolved_sources(self.cfg.tokenizer.corpus)
        parts, self.val_loaders = [], {}
        for i, src in enumerate(sources):
            split = open_split(src.dir, "train", verify=d.verify_checksums)
            parts.append((src.name, PackedLoader(split, d.seq_len, t.micro_batch_size, source_seed(seed, i,
                                                 len(sources)), where=f"{src.dir} (source {src.name}, train)"),
                          src.weight))
            val = open_split(src.dir, "val", verify=d.verify_checksums)
            if val.num_tokens > d.seq_len:
                self.val_loaders[src.name] = PackedLoader(val, d.seq_len, t.micro_batch_size, seed, shuffle=False,
                                                          where=f"{src.dir} (source {src.name}, val)")
        self.weights = {src.name: src.weight for src in sources}
        self.train_loader = BlendedLoader(parts, t.micro_batch_size, rank, world, notice)

    def data_metrics(self) -> dict:
        return {} if self.cfg.data.synthetic else super().data_metrics()

    def batch(self, loader, train: bool = True) -> dict:
        tokens_BR, segments_BR = loader.next()
        return to_tensor_batch(make_text_batch(tokens_BR, segments_BR, self.cfg.model.mtp.depth))

    def loss(self, model, batch: dict, submodel=None):
        return text_loss(model, batch, self.cfg.model.mtp.loss_weight, submodel=submodel,
                         balance_length=self.balance_length)

    def batch_shape(self, batch: dict) -> tuple[int, int]:
        return tuple(batch["input_ids"].shape)

    def pipeline_forward(self, model, batch: dict, pipe_in, submodel=None, chunk: int = 0):
        """This pipeline stage's part of `loss` (its layer chunk `chunk`): (output to send, its balancing loss
        or None) before the model's last chunk; (the loss, None) after it."""
        out = text_backbone(model, batch, submodel, pipe_in, chunk)
        if not model.stage.ends_model(chunk):
            return out.hidden_BSH, out.aux_loss
        return text_heads(model, batch, out, self.cfg.model.mtp.loss_weight, self.balance_length), None

    @staticmethod
    def held_out_value(loss) -> float:
        """The held-out number of a micro-batch's loss object (the last pipeline stage's)."""
        return loss.terms["loss_ntp"]

    def held_out_term(self, model, batch: dict) -> float:
        """The plain next-token loss (no MTP, no token balancing), so evaluations of any run compare."""
        return float(text_loss(model, batch, 0.0).terms["loss_ntp"])


class UnifiedTask(_Task):
    """The unified multimodal objective on multimodal shards; its modality weighting is stateful."""

    def __init__(self, cfg: RunConfig, rank: int, world: int, notice=None):
        self.cfg = cfg
        self.data = UnifiedBatches(cfg, rank, world, notice)
        self.objective = UnifiedObjective(cfg.objective, cfg.model.mtp.loss_weight, cfg.data.seq_len)
        self.train_loader, self.val_loaders, self.weights = self.data.train, self.data.val, self.data.weights

    def batch(self, loader, train: bool = True) -> dict:
        return self.data.batch(loader, train)

    def batch_shape(self, batch: dict) -> tuple[int, int]:
        return tuple(batch["token"].shape)

    def pipeline_forward(self, model, batch: dict, pipe_in, submodel=None, chunk: int = 0):
        """This pipeline stage's part of `loss` (see `TextTask.pipeline_forward`); the last stage embeds the
        batch again for MTP's inputs (its copies of the embedding and modality inputs)."""
        obj = self.objective
        first, last = model.stage.starts_model(chunk), model.stage.ends_model(chunk)
        emb = model.embed_unified(batch) if first or (last and len(model.mtp)) else None  # MTP's inputs
        out = obj.backbone(model, batch, submodel, emb if first else None, pipe_in, chunk)
        if not last:
            return out.hidden_BSH, out.aux_loss
        return obj.heads(model, batch, out, emb), None

    @staticmethod
    def held_out_value(loss) -> float:
        return sum(loss.terms.get(f"loss_{m}", 0.0) for m in MODALITY_TERMS)

    def loss(self, model, batch: dict, submodel=None):
        return self.objective.loss(model, batch, submodel)

    def held_out_term(self, model, batch: dict) -> float:
        """The sum of the per-modality losses (held-out batches are never corrupted, nothing is noted)."""
        terms = self.objective.loss(model, batch, None, record=False).terms
        return sum(terms.get(f"loss_{m}", 0.0) for m in MODALITY_TERMS)

    def finish_step(self, applied: bool, sum_fn) -> None:
        """The posterior weighting moves only on applied steps, from all ranks' values."""
        self.objective.finish_step(applied, sum_fn)

    def stateful(self) -> dict:
        return {"objective": self.objective}


def overall_val_loss(per_source: dict[str, float], weights: dict[str, float]) -> float:
    """The mixture's held-out loss: the sources' losses weighted by their training weights (the plain mean when
    no source with held-out data has a positive weight)."""
    w = np.array([weights.get(name, 0.0) for name in per_source])
    values = np.array(list(per_source.values()))
    return float(values @ w / w.sum()) if w.sum() > 0 else float(values.mean())


def build_task(cfg: RunConfig, rank: int, world: int, notice=None):
    """The task a resolved config describes: unified when the shards are multimodal, else text. `notice(name,
    epoch)` hears when a source's rows run out and it starts another epoch."""
    return (UnifiedTask if cfg.model.multimodal.enabled else TextTask)(cfg, rank, world, notice)
