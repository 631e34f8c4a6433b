"""What a workload contributes to the training loop: its data, the loss of a micro-batch, the held-out loss,
FLOPs per token, and the state it carries across steps.

A task is built from the resolved run config. The loop (`ernie5.train.trainer.Trainer`) only calls the methods
below, so a new workload is a new task class, not a branch in the loop:

- `train_loader` / `val_loader` (None: no held-out split): resumable loaders (`position`, `state_dict`);
- `batch(loader, train)`: the next micro-batch of `loader` as tensors;
- `loss(model, batch, submodel)`: an object with `.total` (the tensor to differentiate) and `.terms`
  (floats to log);
- `eval_loss(model, batches)`: the mean held-out loss over the first `batches` micro-batches (None without a
  held-out split), from the task's `held_out_term` of each;
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
from ernie5.data.loader import PackedLoader, SyntheticLoader
from ernie5.data.shards import open_split
from ernie5.model.transformer import to_tensor_batch
from ernie5.objectives.text import make_text_batch, text_backbone, text_heads, text_loss
from ernie5.objectives.unified import UnifiedObjective
from ernie5.runconfig import RunConfig
from ernie5.train.unified_data import UnifiedBatches


class _Task(ABC):
    val_loader = None

    def eval_loss(self, model, batches: int) -> Optional[float]:
        if self.val_loader is None:
            return None
        self.val_loader.position = 0  # the same held-out batches every time, so evaluations compare
        return float(np.mean([self.held_out_term(model, self.batch(self.val_loader, train=False))
                              for _ in range(batches)]))

    @abstractmethod
    def held_out_term(self, model, batch: dict) -> float:
        """The number one held-out micro-batch contributes to `eval_loss`."""

    def finish_step(self, applied: bool, sum_fn) -> None:
        pass

    def stateful(self) -> dict:
        return {}


class TextTask(_Task):
    """Next-token (+ MTP) prediction on packed text rows, or synthetic tokens (`data.synthetic`)."""

    def __init__(self, cfg: RunConfig, rank: int, world: int):
        cfg.objective.check_text_only("objective")
        self.cfg = cfg
        self.train_loader, self.val_loader = self._loaders(rank, world)
        # token-balanced loss: C tokens per row (0: plain masked means)
        self.balance_length = (cfg.objective.token_balance_length or cfg.data.seq_len) \
            if cfg.objective.token_balanced else 0

    def _loaders(self, rank: int, world: int):
        d, t, seed = self.cfg.data, self.cfg.train, self.cfg.run.seed
        if d.synthetic:
            V = self.cfg.model.vocab_size
            return (SyntheticLoader(V, d.seq_len, t.micro_batch_size, seed, rank, world),
                    SyntheticLoader(V, d.seq_len, t.micro_batch_size, seed + 1))
        train = PackedLoader(open_split(d.dir, "train"), d.seq_len, t.micro_batch_size, seed, rank, world,
                             where=f"{d.dir} (train split)")
        val_split = open_split(d.dir, "val")
        val = (PackedLoader(val_split, d.seq_len, t.micro_batch_size, seed, shuffle=False, where=f"{d.dir} (val)")
               if val_split.num_tokens > d.seq_len else None)
        return train, val

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

    def __init__(self, cfg: RunConfig, rank: int, world: int):
        self.cfg = cfg
        self.data = UnifiedBatches(cfg, rank, world)
        self.objective = UnifiedObjective(cfg.objective, cfg.model.mtp.loss_weight, cfg.data.seq_len)
        self.train_loader, self.val_loader = self.data.train, self.data.val

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


def build_task(cfg: RunConfig, rank: int, world: int):
    """The task a resolved config describes: unified when the shards are multimodal, else text."""
    return (UnifiedTask if cfg.model.multimodal.enabled else TextTask)(cfg, rank, world)
