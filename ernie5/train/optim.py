"""AdamW setup and learning-rate schedules."""

from __future__ import annotations

import math

import paddle

from ernie5.train.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (1-based): linear warmup, then wsd / cosine / constant to `min_lr`."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(max_steps - cfg.warmup_steps, 1)
        frac = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
    decay_steps = int(round(cfg.decay_fraction * max_steps))  # wsd: warmup, stable, linear decay at the end
    decay_start = max_steps - decay_steps
    if decay_steps == 0 or step <= decay_start:
        return cfg.lr
    frac = min((step - decay_start) / decay_steps, 1.0)
    return cfg.lr + (cfg.min_lr - cfg.lr) * frac


def _no_decay(param: paddle.Tensor) -> bool:
    return len(param.shape) == 1 or getattr(param, "is_router", False)


def build_optimizer(model_or_params, cfg: OptimConfig) -> paddle.optimizer.AdamW:
    """AdamW (decoupled decay) with no decay on norms, biases and the router; router LR scaled by its ratio."""
    source = model_or_params.parameters() if isinstance(model_or_params, paddle.nn.Layer) else model_or_params
    params = [p for p in source if not p.stop_gradient]
    no_decay = {p.name for p in params if _no_decay(p)}
    for p in params:
        if getattr(p, "is_router", False):
            p.optimize_attr["learning_rate"] = cfg.router_lr_ratio
    return paddle.optimizer.AdamW(
        learning_rate=cfg.lr, parameters=params, beta1=cfg.beta1, beta2=cfg.beta2, epsilon=cfg.eps,
        weight_decay=cfg.weight_decay, apply_decay_param_fun=lambda name: name not in no_decay,
    )


@paddle.no_grad()
def scale_grads(params: list[paddle.Tensor], factor: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.scale_(factor)
