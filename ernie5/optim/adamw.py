"""AdamW: parameter groups (no decay on norms and routers, the router LR ratio) and the fused multi-tensor step."""

from __future__ import annotations

import numpy as np
import paddle

from ernie5 import kernels
from ernie5.optim.config import OptimConfig


def _no_decay(param: paddle.Tensor) -> bool:
    return len(param.shape) == 1 or getattr(param, "is_router", False)


def _detached(x: paddle.Tensor) -> paddle.Tensor:
    d = x.detach()
    d.stop_gradient = True
    return d


class FusedAdamW(paddle.optimizer.AdamW):
    """Paddle's AdamW (same formula, accumulators and state_dict) whose per-parameter updates are gathered and
    run as one multi-threaded multi-tensor kernel (`e5_adamw_multi`, ernie5/kernels) for the parameters it can
    take: plain fp32 on CPU with the fused kernels on. Others (and every parameter on GPUs, with amsgrad, lazy
    mode, an lr_ratio, or master weights) go through Paddle's own per-parameter op.

    `grad_scale` multiplies the gradients as the step reads them: gradient clipping without its own pass over
    every gradient. `ParallelRuntime` sets it before a step and resets it after."""

    grad_scale = 1.0
    _pending: tuple | list = ()  # a fresh list per step from `_create_optimization_pass`

    def _fusable(self, param, grad) -> bool:
        return (not self._amsgrad and not self._lazy_mode and self._lr_ratio is None
                and isinstance(self._beta1, float) and isinstance(self._beta2, float)
                and not (self._multi_precision and param.dtype != paddle.float32)
                and kernels.usable(param, grad))

    def _create_optimization_pass(self, *args, **kwargs):
        self._pending = []  # one step's fusable updates, run by `_finish_update`; never carried past a step
        try:
            return super()._create_optimization_pass(*args, **kwargs)
        finally:
            self._pending = []

    def _append_optimize_op(self, block, param_and_grad):
        if not paddle.in_dynamic_mode():
            if self.grad_scale != 1.0:
                raise RuntimeError("FusedAdamW.grad_scale is for dynamic-graph training only")
            return super()._append_optimize_op(block, param_and_grad)
        param, grad = param_and_grad["params"] if isinstance(param_and_grad, dict) else param_and_grad
        if isinstance(param_and_grad, dict) or not self._fusable(param, grad):  # Paddle's own op for this one
            if self.grad_scale != 1.0:
                grad.scale_(self.grad_scale)
            return super()._append_optimize_op(block, param_and_grad)
        acc = self._get_accumulator_master
        decay = self._apply_decay_param_fun is None or self._apply_decay_param_fun(param.name)
        self._pending.append((param, grad, acc(self._moment1_acc_str, param), acc(self._moment2_acc_str, param),
                              acc(self._beta1_pow_acc_str, param), acc(self._beta2_pow_acc_str, param),
                              float(self._create_param_lr(param_and_grad).item()), decay))
        return None

    def _finish_update(self, block, parameters_and_grads):
        pending, self._pending = self._pending, []
        if pending:
            p, g, m1, m2, b1, b2, lr, decay = (list(col) for col in zip(*pending))
            lr_decay = paddle.to_tensor(np.stack([lr, np.asarray(decay, np.float32)], 1).astype(np.float32),
                                        place=paddle.CPUPlace())
            # detached views share the memory; Paddle's custom-op layer refuses in-place writes to leaves that
            # do not stop gradient, which is what parameters (and a detached tensor's autograd meta) look like
            p, m1, m2, b1, b2 = ([_detached(x) for x in xs] for xs in (p, m1, m2, b1, b2))
            with paddle.no_grad():
                kernels.ops().e5_adamw_multi(p, g, m1, m2, b1, b2, lr_decay, self._beta1, self._beta2,
                                             float(self._epsilon), float(self._weight_decay), float(self.grad_scale))
        return super()._finish_update(block, parameters_and_grads)


def build_optimizer(model_or_params, cfg: OptimConfig) -> paddle.optimizer.AdamW:
    """AdamW (decoupled decay) with no decay on norms, biases and the router; router LR scaled by its ratio;
    fp32 master weights for bf16 / fp16 parameters."""
    source = model_or_params.parameters() if isinstance(model_or_params, paddle.nn.Layer) else model_or_params
    params = [p for p in source if not p.stop_gradient]
    no_decay = {p.name for p in params if _no_decay(p)}
    for p in params:
        if getattr(p, "is_router", False):
            p.optimize_attr["learning_rate"] = cfg.router_lr_ratio
    # bf16 weights (AMP O2 on GPU: ernie5.model.mixed_precision) get fp32 master weights and fp32 Adam states;
    # fp32 parameters (every CPU run, the bf16 emulation included) are their own master weights
    low = any(p.dtype in (paddle.bfloat16, paddle.float16) for p in params)
    return FusedAdamW(
        learning_rate=cfg.lr, parameters=params, beta1=cfg.beta1, beta2=cfg.beta2, epsilon=cfg.eps,
        weight_decay=cfg.weight_decay, apply_decay_param_fun=lambda name: name not in no_decay, multi_precision=low,
    )


@paddle.no_grad()
def scale_grads(params: list[paddle.Tensor], factor: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.scale_(factor)
