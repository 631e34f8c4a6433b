"""Text objective: next-token prediction plus multi-token prediction (MTP), on packed rows.

A packed row holds S + 1 tokens; inputs are the first S. Depth k (0 = NTP) at position t predicts token t+1+k;
the target is masked when it lies past the row or in a different document than position t. MTP depth k >= 1
embeds x_{t+k} (zero-padded past the row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F

from ernie5 import kernels
from ernie5.kernels.fused import HeadCE
from ernie5.model.rope import text_positions
from ernie5.model.transformer import UnifiedModel
from ernie5.objectives.mtp import mtp_loss
from ernie5.constants import IGNORE
from ernie5.objectives.parallel_ce import ce_threads, chunked_ce
from ernie5.objectives.vocab_parallel import vocab_parallel_row_losses


def make_text_batch(tokens_BR: np.ndarray, segments_BR: np.ndarray, mtp_depth: int) -> dict[str, np.ndarray]:
    """From rows of R = S + 1 tokens and document ids: inputs, positions and per-depth targets (numpy)."""
    B, R = tokens_BR.shape
    S = R - 1
    batch = {"input_ids": tokens_BR[:, :S].astype(np.int64), "segment_ids": segments_BR[:, :S].astype(np.int64)}
    batch["positions"] = text_positions(batch["segment_ids"])
    for k in range(mtp_depth + 1):
        tgt = np.full((B, S), IGNORE, dtype=np.int64)
        n = S - k  # positions t with t + 1 + k <= S
        if n > 0:
            same = segments_BR[:, 1 + k:1 + k + n] == segments_BR[:, :n]
            tgt[:, :n] = np.where(same, tokens_BR[:, 1 + k:1 + k + n], IGNORE)
        batch[f"labels_{k}"] = tgt
        if k >= 1:
            nxt = np.zeros((B, S), dtype=np.int64)
            nxt[:, :S - k + 1] = tokens_BR[:, k:S + 1]
            batch[f"mtp_ids_{k}"] = nxt
    return batch


def head_row_losses(model: UnifiedModel, normed_NH: paddle.Tensor, labels_N: paddle.Tensor) -> paddle.Tensor:
    """Per-row cross-entropy [N] of the text head on already normalised hidden rows (0 where the label is
    IGNORE). On CPU with the fused kernels: one head GEMM whose logits become their own gradient in place
    (`HeadCE`); on CPU without them, row chunks whose CE kernels run in parallel (`chunked_ce`, one chunk per OMP
    thread); elsewhere one logits tensor and `F.cross_entropy`. Under tensor parallelism: the vocabulary-parallel
    CE (`ernie5.objectives.vocab_parallel`)."""
    if model.tp is not None:  # vocabulary-parallel head: the CE is reduced over the tensor-parallel group
        return vocab_parallel_row_losses(model, normed_NH, labels_N)
    lab_N1 = labels_N.reshape([-1, 1])
    N = normed_NH.shape[0]
    weight, w_is_VH = model.head_weight()
    if weight is not None and kernels.usable(normed_NH, weight):
        return HeadCE.apply(normed_NH, weight, labels_N.reshape([-1]).astype("int64"), w_is_VH)
    if not normed_NH.place.is_cpu_place():
        logits = model.logits_from_normed(normed_NH).astype("float32")
        return F.cross_entropy(logits, lab_N1, ignore_index=IGNORE, reduction="none").reshape([-1])
    chunks = max(1, min(ce_threads(), N))
    sizes = [N // chunks + (1 if i < N % chunks else 0) for i in range(chunks)]
    hs, labs = (paddle.split(normed_NH, sizes), paddle.split(lab_N1, sizes)) if chunks > 1 else ([normed_NH], [lab_N1])
    return paddle.concat(chunked_ce([model.logits_from_normed(x) for x in hs], labs)).reshape([-1])


def token_balanced(total: paddle.Tensor, mean: paddle.Tensor, denom: float) -> paddle.Tensor:
    """ERNIE 4.5's token-balanced loss: the value of `mean` (a masked mean, for logging and comparison) with the
    gradient of `total / denom`, `denom` a constant (C tokens per row x rows). A row's per-token gradient then
    does not depend on how many of its positions carry this loss (image-heavy rows do not shrink their text's)."""
    tb = total / float(denom)
    return tb + (mean - tb).detach()


def head_ce(model: UnifiedModel, hidden_BSH: paddle.Tensor, labels_BS: paddle.Tensor,
            balance_length: int = 0) -> tuple[paddle.Tensor, int]:
    """Mean cross-entropy of the text head (final norm + output head) over positions whose label is not IGNORE,
    and how many there were; per-row losses from `head_row_losses` (on CPU no full logits tensor, and the CE
    kernels in parallel). `balance_length` C > 0: token-balanced (gradient of the sum / (C x rows))."""
    h = model.norm(hidden_BSH)
    loss_N = head_row_losses(model, h.reshape([-1, h.shape[-1]]), labels_BS.reshape([-1]))
    count = int((labels_BS != IGNORE).astype("int64").sum())
    total = loss_N.sum()  # ignored rows' losses are 0
    mean = total / max(count, 1)
    if balance_length:
        mean = token_balanced(total, mean, balance_length * hidden_BSH.shape[0])
    return mean, count


@dataclass
class TextLoss:
    total: paddle.Tensor  # what backward() is called on
    terms: dict[str, float]  # every loss term, logged separately
    tokens: int


def text_backbone(model: UnifiedModel, batch: dict[str, paddle.Tensor], submodel=None, pipe_in=None, chunk: int = 0):
    """The backbone on a text batch (`pipe_in`, `chunk`: a pipeline stage's input and layer chunk, see
    `UnifiedModel.backbone`)."""
    return model.backbone(batch["input_ids"], batch["positions"], batch["segment_ids"], submodel, pipe_in=pipe_in,
                          chunk=chunk)


def text_loss(model: UnifiedModel, batch: dict[str, paddle.Tensor], mtp_weight: float, submodel=None,
              balance_length: int = 0) -> TextLoss:
    """NTP (+ MTP, + balancing aux) loss; `submodel` trains an elastic sub-model (None: the full model);
    `balance_length` C > 0 makes NTP and every MTP depth token-balanced (`token_balanced`)."""
    return text_heads(model, batch, text_backbone(model, batch, submodel), mtp_weight, balance_length)


def text_heads(model: UnifiedModel, batch: dict[str, paddle.Tensor], out, mtp_weight: float,
               balance_length: int = 0) -> TextLoss:
    """The loss from the backbone's output `out` (the last pipeline stage's part of `text_loss`)."""
    run = model.probe.run  # the head's loss is a probed step of the model (`ernie5.model.probe`)
    ntp, tokens = run("head_loss", "head_ce", head_ce, model, out.hidden_BSH, batch["labels_0"], balance_length)
    total, terms = ntp, {"loss_ntp": float(ntp)}
    mtp = mtp_loss(model, out, lambda k: model.embed(batch[f"mtp_ids_{k}"]),  # x_{t+k}: ids from the batch
                   lambda k, h: run("head_loss", "head_ce", head_ce, model, h, batch[f"labels_{k}"],
                                    balance_length)[0], mtp_weight, terms)
    if mtp is not None:
        total = total + mtp
    if out.aux_loss is not None:
        terms["loss_aux"] = float(out.aux_loss)
        total = total + out.aux_loss
    return TextLoss(total, terms, tokens)
