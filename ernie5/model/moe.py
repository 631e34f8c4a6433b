"""Mixture-of-experts layer: fp32 router with aux-free bias, routed SwiGLU experts, ungated shared experts.

Router math (SPEC §1): probs = softmax(x W_g) in fp32; chosen = topk(probs + b); weights = probs[chosen] /
max(sum, norm_min). The bias b only chooses experts; it is moved by `update_bias` after each optimizer step from
the expert loads counted over the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie5.model.config import ModelConfig, MoEConfig
from ernie5.model.dispatch import LocalDispatcher
from ernie5.model.layers import SwiGLU


@dataclass
class Routing:
    topk_ids_TK: paddle.Tensor
    topk_w_TK: paddle.Tensor
    probs_TE: paddle.Tensor
    logits_TE: paddle.Tensor


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

    def forward(self, x_TH: paddle.Tensor, top_k: Optional[int] = None) -> Routing:
        k = top_k or self.cfg.top_k
        logits_TE = paddle.matmul(x_TH.astype("float32"), self.weight)
        probs_TE = F.softmax(logits_TE, axis=-1)
        _, topk_ids_TK = paddle.topk(probs_TE.detach() + self.e_score_correction_bias, k, axis=-1)
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


class MoELayer(nn.Layer):
    """Routed experts (+ shared experts). Keeps the step's per-expert token counts for balancing and stats."""

    def __init__(self, cfg: ModelConfig, dispatcher=None, recompute_gate_up: bool = False):
        super().__init__()
        m = cfg.moe
        self.cfg = m
        self.router = Router(cfg.hidden_size, m, cfg.init_std)
        self.experts = nn.LayerList([SwiGLU(cfg.hidden_size, m.expert_ffn_size, cfg.init_std, recompute_gate_up)
                                     for _ in range(m.num_experts)])
        self.shared = (SwiGLU(cfg.hidden_size, m.expert_ffn_size * m.num_shared_experts, cfg.init_std,
                              recompute_gate_up) if m.num_shared_experts else None)
        self.dispatcher = dispatcher or LocalDispatcher()
        self.step_counts = np.zeros(m.num_experts, dtype=np.int64)

    @property
    def has_aux(self) -> bool:
        """Whether training forward returns a balancing loss (some coefficient is > 0)."""
        m = self.cfg
        return m.aux_loss_coef > 0 or m.seq_aux_loss_coef > 0 or m.z_loss_coef > 0

    def forward(self, x_BSH: paddle.Tensor) -> tuple[paddle.Tensor, Optional[paddle.Tensor]]:
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape([B * S, H])
        r = self.router(x_TH)
        counts_E = paddle.bincount(r.topk_ids_TK.flatten(), minlength=self.cfg.num_experts).numpy()
        y_TH = self.dispatcher(x_TH, r.topk_ids_TK, r.topk_w_TK, counts_E, lambda e, xs: self.experts[e](xs))
        if self.shared is not None:
            y_TH = y_TH + self.shared(x_TH)
        aux = None
        if self.training:
            if paddle.is_grad_enabled():  # not in recompute's no-grad first pass: one count per micro-batch
                self.step_counts += counts_E
            aux = balance_losses(self.cfg, r, counts_E, B)
        return y_TH.reshape([B, S, H]), aux

    @paddle.no_grad()
    def update_bias(self, rate: float, counts_E: np.ndarray) -> None:
        """Aux-free balancing: b_i += rate * sign(mean_load - load_i)."""
        step = rate * np.sign(counts_E.mean() - counts_E)
        bias = self.router.e_score_correction_bias
        bias.set_value(bias + paddle.to_tensor(step, dtype="float32"))
