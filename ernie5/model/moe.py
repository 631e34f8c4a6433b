"""Mixture-of-experts layer: fp32 router with aux-free bias, routed SwiGLU experts, ungated shared experts.

Router math (SPEC §1): probs = softmax(x W_g) in fp32; chosen = topk(probs + b); weights = probs[chosen] /
max(sum, norm_min). The bias b only chooses experts; it is moved by `update_bias` after each optimizer step from
the expert loads counted over the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie5.model.config import ModelConfig, MoEConfig
from ernie5.model.dispatch import LocalDispatcher
from ernie5.precision.fp8_linear import quantize_for_dispatch
from ernie5.model.layers import SwiGLU


@dataclass
class Routing:
    topk_ids_TK: paddle.Tensor
    topk_w_TK: paddle.Tensor
    probs_TE: paddle.Tensor
    logits_TE: paddle.Tensor


def sub_routing(submodel, cfg: MoEConfig) -> tuple[Optional[Sequence[int]], Optional[int]]:
    """(kept experts, top_k) of an elastic sub-model; (None, None) when it routes like the full model."""
    if submodel is None:
        return None, None
    experts = submodel.experts
    if experts is not None and len(experts) == cfg.num_experts:
        experts = None
    top_k = None if submodel.top_k in (None, cfg.top_k) else submodel.top_k
    return experts, top_k


def dropped_expert_mask(num_experts: int, experts: Optional[Sequence[int]]) -> np.ndarray:
    """[E] fp32: 0 for kept experts (all when `experts` is None), -inf for dropped ones."""
    mask_E = np.zeros(num_experts, dtype=np.float32)
    if experts is not None:
        mask_E[:] = -np.inf
        mask_E[list(experts)] = 0.0
    return mask_E


class Router(nn.Layer):
    """Gate weight [H, E] and correction bias [E], both fp32; the bias is a buffer, not a parameter."""

    def __init__(self, hidden_size: int, cfg: MoEConfig, std: float):
        super().__init__()
        self.cfg = cfg
        self.weight = self.create_parameter([hidden_size, cfg.num_experts], dtype="float32",
                                            default_initializer=nn.initializer.Normal(0.0, std))
        self.weight.is_router = True  # the optimizer gives it router_lr_ratio and no weight decay
        self.register_buffer("e_score_correction_bias", paddle.zeros([cfg.num_experts], dtype="float32"),
                             persistable=True)

    def forward(self, x_TH: paddle.Tensor, top_k: Optional[int] = None,
                experts: Optional[Sequence[int]] = None) -> Routing:
        """`experts` (kept expert ids) or a `top_k` other than the configured one route a sub-model (elastic
        training, SPEC §3): dropped experts' logits are -inf before the softmax, and the aux-free bias, tuned for
        the full model, is not used for selection."""
        k = top_k or self.cfg.top_k
        logits_TE = paddle.matmul(x_TH.astype("float32"), self.weight)
        select_E = self.e_score_correction_bias
        keep_E = None
        if experts is not None or k != self.cfg.top_k:
            select_E = paddle.to_tensor(dropped_expert_mask(self.cfg.num_experts, experts))
        if experts is not None:
            keep_E = paddle.isfinite(select_E)
            # where (not +): dropped experts' gate columns get an exact zero gradient
            logits_TE = paddle.where(keep_E, logits_TE, paddle.full_like(logits_TE, float("-inf")))
        probs_TE = F.softmax(logits_TE, axis=-1)
        if keep_E is not None:  # paddle's CPU softmax floors exp at exp(-64), not 0: make dropped probs exact 0
            probs_TE = probs_TE * keep_E.astype(probs_TE.dtype)
        # -inf on dropped experts also in the selection score, so they lose even where a kept prob underflows to 0
        _, topk_ids_TK = paddle.topk(probs_TE.detach() + select_E, k, axis=-1)
        chosen_TK = paddle.take_along_axis(probs_TE, topk_ids_TK, axis=-1)
        denom_T1 = paddle.clip(chosen_TK.sum(-1, keepdim=True), min=self.cfg.norm_min)
        return Routing(topk_ids_TK, chosen_TK / denom_T1, probs_TE, logits_TE)


def balance_losses(cfg: MoEConfig, r: Routing, counts_E: np.ndarray, batch_size: int) -> Optional[paddle.Tensor]:
    """Optional Switch aux loss, sequence aux loss and router z-loss (None when all coefficients are 0)."""
    E, (T, K) = cfg.num_experts, r.topk_ids_TK.shape
    terms = []
    if cfg.aux_loss_coef > 0:
        frac_E = paddle.to_tensor(counts_E / (T * K), dtype="float32")
        terms.append(cfg.aux_loss_coef * E * (frac_E * r.probs_TE.mean(0)).sum())
    if cfg.seq_aux_loss_coef > 0:
        S = T // batch_size
        hits_BSE = F.one_hot(r.topk_ids_TK, E).sum(1).reshape([batch_size, S, E])
        frac_BE = hits_BSE.sum(1) * (E / (K * S))
        terms.append(cfg.seq_aux_loss_coef * (frac_BE * r.probs_TE.reshape([batch_size, S, E]).mean(1)).sum(-1).mean())
    if cfg.z_loss_coef > 0:
        terms.append(cfg.z_loss_coef * paddle.logsumexp(r.logits_TE, axis=-1).pow(2).mean())
    return paddle.add_n(terms) if terms else None


@dataclass
class ExpertPlacement:
    """Which routed experts live in this process (global ids) and the dispatcher that reaches the others."""

    expert_ids: list[int]
    dispatcher: object


class MoELayer(nn.Layer):
    """Routed experts (+ shared experts). Keeps the step's per-expert token counts for balancing and stats.

    `self.experts[l]` is global expert `self.expert_ids[l]`; with no placement every expert is local.
    """

    def __init__(self, cfg: ModelConfig, placement: Optional[ExpertPlacement] = None,
                 recompute_gate_up: bool = False, layer: int = 0, seed: int = 0):
        super().__init__()
        m = cfg.moe
        self.cfg = m
        self.router = Router(cfg.hidden_size, m, cfg.init_std)
        self.expert_ids = placement.expert_ids if placement else list(range(m.num_experts))
        # each routed expert's init is keyed by (seed, layer, global id): identical under any EP layout
        self.experts = nn.LayerList([SwiGLU(cfg.hidden_size, m.expert_ffn_size, cfg.init_std, recompute_gate_up,
                                            init_key=[seed, layer, gid]) for gid in self.expert_ids])
        self.shared = (SwiGLU(cfg.hidden_size, m.expert_ffn_size * m.num_shared_experts, cfg.init_std,
                              recompute_gate_up) if m.num_shared_experts else None)
        self.dispatcher = placement.dispatcher if placement else LocalDispatcher()
        self.step_counts = np.zeros(m.num_experts, dtype=np.int64)
        self.fp8 = None  # FP8Config when precision.fp8 is on (tokens may be quantised before dispatch)

    @property
    def has_aux(self) -> bool:
        """Whether training forward returns a balancing loss (some coefficient is > 0)."""
        m = self.cfg
        return m.aux_loss_coef > 0 or m.seq_aux_loss_coef > 0 or m.z_loss_coef > 0

    def forward(self, x_BSH: paddle.Tensor, submodel=None) -> tuple[paddle.Tensor, Optional[paddle.Tensor]]:
        """`submodel` (an elastic SubModel or None) may restrict the experts and lower top-k."""
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape([B * S, H])
        experts, top_k = sub_routing(submodel, self.cfg)
        r = self.router(x_TH, top_k, experts)
        counts_E = paddle.bincount(r.topk_ids_TK.flatten(), minlength=self.cfg.num_experts).numpy()
        x_send = x_TH
        if self.fp8 is not None and self.fp8.quantize_dispatch:
            x_send = quantize_for_dispatch(x_TH, self.fp8)
        y_TH = self.dispatcher(x_send, r.topk_ids_TK, r.topk_w_TK, counts_E, lambda e, xs: self.experts[e](xs))
        if self.shared is not None:
            y_TH = y_TH + self.shared(x_TH)
        aux = None
        if self.training:
            # not in recompute's no-grad first pass (one count per micro-batch), and not for a sub-model's
            # routing: the aux-free bias balances the full model only, so its loads alone move the bias
            if paddle.is_grad_enabled() and experts is None and top_k is None:
                self.step_counts += counts_E
            aux = balance_losses(self.cfg, r, counts_E, B)
        return y_TH.reshape([B, S, H]), aux

    @paddle.no_grad()
    def update_bias(self, rate: float, counts_E: np.ndarray) -> None:
        """Aux-free balancing: b_i += rate * sign(mean_load - load_i)."""
        step = rate * np.sign(counts_E.mean() - counts_E)
        bias = self.router.e_score_correction_bias
        bias.set_value(bias + paddle.to_tensor(step, dtype="float32"))
