"""Multi-token prediction (MTP) depths, shared by the text and the unified objectives.

Depth k (1-based) runs MTP block k on the previous depth's hidden state (the backbone's for k = 1) and the input
embedding of x_{t+k}; the text head reads the result to predict x_{t+1+k}. The depths' losses are averaged and
weighted into the total. What differs between the objectives is passed in: how x_{t+k} is embedded
(`next_embeds`) and how a depth's hidden state becomes its loss (`depth_loss`: which positions, which
reduction, token-balanced or not).
"""

from __future__ import annotations

from typing import Callable, Optional

import paddle

from ernie5.model.transformer import BackboneOut, UnifiedModel


def mtp_loss(model: UnifiedModel, out: BackboneOut, next_embeds: Callable[[int], paddle.Tensor],
             depth_loss: Callable[[int, paddle.Tensor], Optional[paddle.Tensor]], weight: float,
             terms: dict[str, float]) -> Optional[paddle.Tensor]:
    """`weight` x the mean of the depths' losses, to add to the total; None when the model has no MTP block or
    no depth has a target. Every depth's hidden state is computed (depth k + 1 builds on it) even when
    `depth_loss` returns None for it (no position with a depth-k target); each depth that has a loss logs it
    in `terms` as `loss_mtp_k`."""
    h = out.hidden_BSH
    losses = []
    for k in range(1, len(model.mtp) + 1):
        h = model.mtp_hidden(k, h, next_embeds(k), out)
        loss_k = depth_loss(k, h)
        if loss_k is None:
            continue
        terms[f"loss_mtp_{k}"] = float(loss_k)
        losses.append(loss_k)
    if not losses:
        return None
    return weight * paddle.add_n(losses) / len(losses)
