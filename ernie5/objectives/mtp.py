"""Multi-token prediction (MTP) depths, shared by the text and the unified objectives.

Depth k (1-based) runs MTP block k on the previous depth's hidden state (the backbone's for k = 1) and the input
embedding of x_{t+k}; the text head reads the result to predict x_{t+1+k}. The depths' losses are averaged and
weighted into the total. What differs between the objectives is passed in: how x_{t+k} is embedded
(`next_embeds`), how a depth's hidden state becomes its loss (`depth_loss`: which positions, which reduction,
token-balanced or not) and, optionally, which positions have a target (`targets`).

With `targets` the last depth's block computes queries only at those positions (keys and values still cover
every position, so the result there is the same): in the unified objective only text positions have an MTP
target, ~12% of a digits-world row (measured: ~6% of a unified demo step saved). Earlier depths still run on
every position, since the next depth attends to all of them.
"""

from __future__ import annotations

from typing import Callable, Optional

import paddle

from ernie5.model.transformer import BackboneOut, QueryRows, UnifiedModel


def mtp_loss(model: UnifiedModel, out: BackboneOut, next_embeds: Callable[[int], paddle.Tensor],
             depth_loss: Callable[[int, paddle.Tensor], Optional[paddle.Tensor]], weight: float,
             terms: dict[str, float],
             targets: Optional[Callable[[int], paddle.Tensor]] = None) -> Optional[paddle.Tensor]:
    """`weight` x the mean of the depths' losses, to add to the total; None when the model has no MTP block or
    no depth has a target. Each depth that has a loss logs it in `terms` as `loss_mtp_k`.

    Without `targets`, `depth_loss(k, h_BSH)` gets depth k's whole hidden state (and may return None: no
    target). With `targets(k)` (ascending flat positions b * S + s with a depth-k target), it gets those
    positions' hidden states [N, H] in that order, and a depth with none is skipped."""
    h = out.hidden_BSH
    B, S, H = h.shape
    depth = len(model.mtp)
    losses = []
    for k in range(1, depth + 1):
        if targets is None:
            h = model.mtp_hidden(k, h, next_embeds(k), out)
            loss_k = depth_loss(k, h)
        else:
            idx_N = targets(k)
            if k == depth:  # nothing builds on the last depth: its queries only where it has targets
                loss_k = None if idx_N.shape[0] == 0 else depth_loss(
                    k, model.mtp_hidden(k, h, next_embeds(k), out, QueryRows.from_flat(idx_N, B, S)))
            else:
                h = model.mtp_hidden(k, h, next_embeds(k), out)
                loss_k = None if idx_N.shape[0] == 0 else depth_loss(k, paddle.gather(h.reshape([B * S, H]), idx_N))
        if loss_k is None:
            continue
        terms[f"loss_mtp_{k}"] = float(loss_k)
        losses.append(loss_k)
    if not losses:
        return None
    return weight * paddle.add_n(losses) / len(losses)
