"""bf16 mixed precision for a built model (`precision.dtype: bf16`): bf16 weights and activations, fp32 master
weights and Adam states; the router (gate weight, aux-free bias), the norms (weights and statistics) and the
losses stay fp32.

CPU builds (no bf16 GEMM) emulate it numerically: every `Linear` runs as `ernie5.precision.bf16.bf16_linear`
(operands and output rounded to bf16, fp32 accumulation) and every embedding's output is rounded to bf16 (the
stored table is bf16); the parameters stay fp32 (they are the master weights, so AdamW's states are fp32 too).
The router is not a `Linear` (`ernie5.model.moe.Router`: an fp32 GEMM of its own) and is left alone.

GPU builds use Paddle's AMP O2 instead (`paddle.amp.decorate` casts the weights to bf16; the optimizer keeps
fp32 master weights, `ernie5.optim.adamw.build_optimizer`); `autocast` is the context the forward and the loss
run in. That path cannot run here (no GPU build) and is unexercised.
"""

from __future__ import annotations

import contextlib

import paddle
import paddle.nn as nn

from ernie5.model.layers import Linear, RMSNorm
from ernie5.model.moe import Router
from ernie5.precision.bf16 import round_bf16
from ernie5.precision.config import PrecisionConfig


def _round_output(layer, inputs, output):
    return round_bf16(output)


def enable_bf16(model: nn.Layer, cfg: PrecisionConfig) -> int:
    """Put `model` under bf16 (see the module docstring); returns how many of its GEMMs run in bf16 (CPU: the
    marked `Linear`s plus the tied text head; GPU: the parameters cast to bf16)."""
    if paddle.is_compiled_with_cuda():
        return _decorate_o2(model, cfg)
    count = 0
    layers = model.sublayers(include_self=True)
    text_embed = getattr(model, "embed", None)  # the text table, whatever its class (vocab-parallel under TP)
    for m in layers:
        if isinstance(m, Linear):
            m.bf16 = cfg
            count += m.fp8 is None  # FP8 keeps the linears it covers
        elif (isinstance(m, nn.Embedding) or m is text_embed) and getattr(m, "bf16", None) is None:
            m.bf16 = cfg
            m.register_forward_post_hook(_round_output)
    if getattr(model, "lm_head", 0) is None:  # a tied text head: a GEMM with the embedding table
        model.head_bf16 = cfg  # UnifiedModel.logits_from_normed / head_weight route it through bf16_linear
        count += 1
    return count


def _decorate_o2(model: nn.Layer, cfg: PrecisionConfig) -> int:
    """GPU: Paddle AMP O2 bf16. Norms and routers keep fp32 weights (and the router its fp32 bias); the model's
    own buffers (the RoPE table) stay fp32; `master_grad` makes weight gradients fp32 after backward, so the
    gradient all-reduce runs in fp32 (`precision.grad_allreduce_fp32`)."""
    model._cast_to_low_precision = False  # this layer's own tensors only; its sublayers are cast
    paddle.amp.decorate(models=model, level="O2", dtype="bfloat16", master_weight=True,
                        master_grad=cfg.grad_allreduce_fp32, excluded_layers=[RMSNorm, Router])
    return sum(1 for p in model.parameters() if p.dtype == paddle.bfloat16)


def autocast(cfg: PrecisionConfig):
    """The context to run forward and loss in: AMP O2 bf16 on GPU builds under `dtype: bf16`, else nothing (the
    CPU emulation lives in the GEMMs). Backward runs outside it."""
    if cfg.dtype != "bf16" or not paddle.is_compiled_with_cuda():
        return contextlib.nullcontext()
    return paddle.amp.auto_cast(enable=True, level="O2", dtype="bfloat16")
