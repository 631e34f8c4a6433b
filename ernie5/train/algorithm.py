"""The MoE router updates that are part of every optimizer step (not optional extras):

1. the aux-free balancing bias: b_i += u * sign(mean_load - load_i), from the expert loads of the whole step
   (summed over its micro-batches and the data-parallel ranks), `model.moe.bias_update_rate` = u;
2. the router orthogonal step: one gradient step on every router weight toward orthogonal expert rows,
   coefficient `model.moe.orthogonal_coef`, at the router learning rate (lr x `optim.router_lr_ratio`).

Both run after the parameter update of an applied step, in this order, and not at all on a skipped step.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import paddle

from ernie5.model.config import MoEConfig


def orthogonal_loss(weight_HE: paddle.Tensor) -> paddle.Tensor:
    """||W^ W^T - I||_F^2 / E^2 with W = weight^T (E x H) and W^ its row-normalised form."""
    w_EH = weight_HE.transpose([1, 0])
    w_hat_EH = w_EH / paddle.clip(paddle.linalg.norm(w_EH, axis=1, keepdim=True), min=1e-12)
    E = w_EH.shape[0]
    gram_EE = paddle.matmul(w_hat_EH, w_hat_EH, transpose_y=True)
    return ((gram_EE - paddle.eye(E)) ** 2).sum() / (E * E)


class RouterUpdates:
    """The router part of the optimizer step. `sum_fn` sums an array over the data-parallel ranks."""

    def __init__(self, moe: MoEConfig, router_lr_ratio: float, sum_fn: Callable[[np.ndarray], np.ndarray]):
        self.bias_rate, self.orthogonal_coef = moe.bias_update_rate, moe.orthogonal_coef
        self.router_lr_ratio, self.sum_fn = router_lr_ratio, sum_fn

    def after_step(self, model, lr: float) -> dict:
        """Run both updates after an applied optimizer step at learning rate `lr`; returns metrics to log."""
        self.update_bias(model)
        return self.orthogonal_step(model, lr)

    def update_bias(self, model) -> None:
        if self.bias_rate > 0:
            for layer in model.moe_layers():
                layer.update_bias(self.bias_rate, self.sum_fn(layer.step_counts))

    def orthogonal_step(self, model, lr: float) -> dict:
        if self.orthogonal_coef <= 0:
            return {}
        router_lr = lr * self.router_lr_ratio
        total = 0.0
        routers = [r for layer in model.moe_layers() for r in layer.routers()]
        for router in routers:
            w_HE = router.weight
            loss = orthogonal_loss(w_HE)
            (grad_HE,) = paddle.grad([loss], [w_HE])
            with paddle.no_grad():
                w_HE.set_value(w_HE - router_lr * self.orthogonal_coef * grad_HE)
            total += float(loss)
        return {"router_orthogonal_loss": total / max(len(routers), 1)}
