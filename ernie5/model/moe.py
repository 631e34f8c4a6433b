"""Mixture-of-experts layer: fp32 router with aux-free bias, routed SwiGLU experts, ungated shared experts.

Router math (ERNIE 4.5 keeps the gate in fp32 and balances experts with a selection-only bias instead of an aux
loss): probs = softmax(x W_g) in fp32; chosen = topk(probs + b); weights = probs[chosen] / max(sum, norm_min).
The bias b only chooses experts; it is moved by `update_bias` after each optimizer step from the expert loads
counted over the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie5.constants import IMAGE, NUM_MODALITIES, VIDEO
from ernie5.model.config import ModelConfig, MoEConfig
from ernie5.model.dispatch import LocalDispatcher
from ernie5.precision.fp8_linear import quantize_for_dispatch
from ernie5.model.layers import SwiGLU
from ernie5.comm.regions import TPGroup, sum_numpy
from ernie5.model.tensor_parallel import ParallelSwiGLU, mark_sequence_parallel


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
        training, `ernie5.elastic`): dropped experts' logits are -inf before the softmax, and the aux-free bias,
        tuned for the full model, is not used for selection."""
        k = top_k or self.cfg.top_k
        if paddle.amp.is_autocast_enabled():  # fp32 under GPU AMP O2 too (matmul is on its bf16 list)
            with paddle.amp.auto_cast(enable=False):
                logits_TE = paddle.matmul(x_TH.astype("float32"), self.weight)
        else:
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


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def balance_losses(cfg: MoEConfig, r: Optional[Routing], counts_E: np.ndarray, batch_size: int,
                   row_T: Optional[np.ndarray] = None, reduce=_identity) -> Optional[paddle.Tensor]:
    """Optional Switch aux loss, sequence aux loss and router z-loss (None when all coefficients are 0).

    Every term is over the routed tokens only. `row_T` gives each routed token's row (sequence) when they are
    not all B x S positions (padding is not routed): the sequence loss then averages over each row's own tokens.

    `reduce` sums a NumPy vector over the ranks whose tokens together make the batch (sequence parallelism:
    each tensor-parallel rank routes its own sequence shard). The terms are then this rank's share of the
    whole batch's loss: with the batch's token count T, loads f and per-row hit fractions held fixed, each term
    is a sum over tokens, so the shares add up (over the group) to the one-process loss and its gradient.
    `r` None: this rank routed nothing (all padding); it still joins the one reduction and returns None.
        switch = coef * E * sum_e f_e * (sum_t p_te) / T,        f_e = load_e / (T K)
        seq    = coef * mean_rows sum_e frac_be * (sum_{t in b} p_te) / n_b,   frac_be = hits_be E / (K n_b)
        z      = coef * sum_t logsumexp(logits_t)^2 / T
    """
    if not (cfg.aux_loss_coef > 0 or cfg.seq_aux_loss_coef > 0 or cfg.z_loss_coef > 0):
        return None
    E, K, B = cfg.num_experts, cfg.top_k, batch_size
    T = 0 if r is None else r.topk_ids_TK.shape[0]
    seq = cfg.seq_aux_loss_coef > 0
    if seq and r is not None:
        if row_T is None:
            row_T = np.repeat(np.arange(B, dtype=np.int64), T // B)
        hits_TE = F.one_hot(r.topk_ids_TK, E).sum(1).astype("float32")
        rows_BT = F.one_hot(paddle.to_tensor(row_T, dtype="int64"), B).astype("float32").T
        hits_BE = paddle.matmul(rows_BT, hits_TE).numpy()
        n_B = np.bincount(row_T, minlength=B).astype(np.float64)
    else:
        hits_BE, n_B = np.zeros((B, E)), np.zeros(B)
    local = np.concatenate([[T], np.asarray(counts_E, np.float64) if r is not None else np.zeros(E),
                            *((n_B, hits_BE.reshape(-1)) if seq else ())])
    total = reduce(local.astype(np.float64))
    if r is None:
        return None
    T_all, load_E = max(float(total[0]), 1.0), total[1:1 + E]
    terms = []
    if cfg.aux_loss_coef > 0:
        frac_E = paddle.to_tensor(load_E / (T_all * K), dtype="float32")
        terms.append(cfg.aux_loss_coef * E * (frac_E * r.probs_TE.sum(0)).sum() / T_all)
    if seq:
        n_all_B = total[1 + E:1 + E + B]
        hits_all_BE = total[1 + E + B:].reshape(B, E)
        inv_B1 = (1.0 / np.maximum(n_all_B, 1.0))[:, None]
        frac_BE = paddle.to_tensor(hits_all_BE * inv_B1 * (E / K), dtype="float32")
        mean_probs_BE = paddle.matmul(rows_BT, r.probs_TE) * paddle.to_tensor(inv_B1, dtype="float32")
        rows = float(max((n_all_B > 0).sum(), 1))  # rows with no routed token drop out of the mean
        terms.append(cfg.seq_aux_loss_coef * (frac_BE * mean_probs_BE).sum() / rows)
    if cfg.z_loss_coef > 0:
        terms.append(cfg.z_loss_coef * paddle.logsumexp(r.logits_TE, axis=-1).pow(2).sum() / T_all)
    return paddle.add_n(terms)


@dataclass
class ExpertPlacement:
    """Which routed experts live in this process (global ids) and the dispatcher that reaches the others."""

    expert_ids: list[int]
    dispatcher: object


class MoELayer(nn.Layer):
    """Routed experts (+ shared experts). Keeps the step's per-expert token counts for balancing and stats
    (`step_counts` [E_total], and `modality_counts` [4, E_total] for unified batches).

    `self.experts[l]` is global expert `self.expert_ids[l]`; with no placement every expert is local.
    Isolated routing (ERNIE 4.5-VL) adds `vision_router` / `vision_experts`: image and video tokens route among
    those, text and audio tokens among the text experts; counts list the text experts first, then the vision ones.

    Under tensor parallelism (`tp`) the routed experts and the router are replicated on every TP rank and the
    shared experts are split like the dense FFN. With sequence parallelism each TP rank routes its own sequence
    shard through its full copy of the experts: no TP communication inside the routed path, the experts'
    gradients are summed over the TP group like any sequence-parallel weight, and expert parallelism stays over
    the data-parallel ranks of the same TP rank. (Megatron's alternative, "parallel folding", shards experts over
    TP x DP ranks; it saves expert memory at TP > 1 but needs the token all-to-all across TP ranks too. ERNIE's
    layouts use TP <= 4 with EP carried by data ranks, so replication keeps the expert path unchanged.)
    """

    def __init__(self, cfg: ModelConfig, placement: Optional[ExpertPlacement] = None,
                 recompute_gate_up: bool = False, layer: int = 0, seed: int = 0, tp: Optional[TPGroup] = None):
        super().__init__()
        m = cfg.moe
        self.cfg = m
        self.router = Router(cfg.hidden_size, m, cfg.init_std)
        self.expert_ids = placement.expert_ids if placement else list(range(m.num_experts))
        # each routed expert's init is keyed by (seed, layer, global id): identical under any EP layout
        self.experts = nn.LayerList([SwiGLU(cfg.hidden_size, m.expert_ffn_size, cfg.init_std, recompute_gate_up,
                                            init_key=[seed, layer, gid]) for gid in self.expert_ids])
        self.shared = (ParallelSwiGLU(cfg.hidden_size, m.expert_ffn_size * m.num_shared_experts, cfg.init_std, tp,
                                      recompute_gate_up) if m.num_shared_experts else None)
        self.tp = tp
        self.dispatcher = placement.dispatcher if placement else LocalDispatcher()
        if m.isolated:
            if placement is not None and len(placement.expert_ids) != m.num_experts:
                raise ValueError("isolated routing runs without expert parallelism")
            self.vision_cfg = replace(m, num_experts=m.vision_num_experts, top_k=m.vision_k,
                                      expert_ffn_size=m.vision_expert_ffn_size)
            self.vision_router = Router(cfg.hidden_size, self.vision_cfg, cfg.init_std)
            self.vision_experts = nn.LayerList([
                SwiGLU(cfg.hidden_size, m.vision_expert_ffn_size, cfg.init_std, recompute_gate_up,
                       init_key=[seed, layer, m.num_experts + gid]) for gid in range(m.vision_num_experts)])
        mark_sequence_parallel(self.router, tp)
        mark_sequence_parallel(self.experts, tp)
        if m.isolated:
            mark_sequence_parallel(self.vision_router, tp)
            mark_sequence_parallel(self.vision_experts, tp)
        self.step_counts = np.zeros(m.total_experts, dtype=np.int64)
        self.modality_counts = np.zeros((NUM_MODALITIES, m.total_experts), dtype=np.int64)
        self.fp8 = None  # FP8Config when precision.fp8 is on (tokens may be quantised before dispatch)

    @property
    def has_aux(self) -> bool:
        """Whether training forward returns a balancing loss (some coefficient is > 0)."""
        m = self.cfg
        return m.aux_loss_coef > 0 or m.seq_aux_loss_coef > 0 or m.z_loss_coef > 0

    def routers(self) -> list[Router]:
        return [self.router] + ([self.vision_router] if self.cfg.isolated else [])

    def _routed(self, x_TH, router, experts_list, cfg, experts=None, top_k=None):
        """Route tokens with one router over its expert group: (y [T, H], routing, counts [E])."""
        r = router(x_TH, top_k, experts)
        counts_E = paddle.bincount(r.topk_ids_TK.flatten(), minlength=cfg.num_experts).numpy()
        x_send = x_TH
        if self.fp8 is not None and self.fp8.quantize_dispatch:
            x_send = quantize_for_dispatch(x_TH, self.fp8)
        y_TH = self.dispatcher(x_send, r.topk_ids_TK, r.topk_w_TK, counts_E, lambda e, xs: experts_list[e](xs))
        return y_TH, r, counts_E

    def forward(self, x_BSH: paddle.Tensor, submodel=None,
                modality_BS: Optional[paddle.Tensor] = None) -> tuple[paddle.Tensor, Optional[paddle.Tensor]]:
        """`submodel` (an elastic SubModel or None) may restrict the experts and lower top-k; `modality_BS`
        (unified batches) counts loads per modality and, under isolated routing, picks each token's group.

        Padding positions (modality -1) are not routed: no expert sees them, they add nothing to the step's
        expert counts (which move the aux-free bias) and nothing to the balancing losses; their routed output
        is 0 (shared experts still apply, position-wise, and nothing reads a padding position's output).
        """
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape([B * S, H])
        experts, top_k = sub_routing(submodel, self.cfg)
        counting = self.training and paddle.is_grad_enabled() and experts is None and top_k is None
        if self.cfg.isolated and submodel is not None:
            raise ValueError("elastic sub-models are not supported with isolated routing")
        mod_T = None if modality_BS is None else modality_BS.reshape([-1])
        idx_np = None  # rows of x_TH that are routed (None: all of them)
        if mod_T is not None:
            real_T = mod_T.numpy() >= 0
            if not real_T.all():
                idx_np = np.nonzero(real_T)[0].astype(np.int64)
        dummy = idx_np is not None and idx_np.size == 0  # nothing but padding
        if dummy and isinstance(self.dispatcher, LocalDispatcher):  # no expert runs, no gradient reaches one
            if self.training and not self.cfg.isolated:  # the balancing reduction every TP rank joins
                balance_losses(self.cfg, None, counts_E=None, batch_size=B, reduce=self._reduce)
            y_TH = self.shared(x_BSH).reshape([B * S, H]) if self.shared is not None else paddle.zeros_like(x_TH)
            return y_TH.reshape([B, S, H]), None
        if dummy:
            # under expert parallelism the experts are still called once (row 0, weight 0) so that the
            # collectives every rank of the group must join run; nothing is counted, no balancing loss is formed
            idx_np, counting = np.zeros(1, np.int64), False
        idx = None if idx_np is None else paddle.to_tensor(idx_np)
        xr_TH = x_TH if idx is None else paddle.gather(x_TH, idx)
        modr_T = None if mod_T is None else (mod_T if idx is None else paddle.gather(mod_T, idx))
        if self.cfg.isolated:
            yr_TH, aux, counts_E, ids_TK = self._isolated(xr_TH, modr_T)
        else:
            yr_TH, r, counts_E = self._routed(xr_TH, self.router, self.experts, self.cfg, experts, top_k)
            aux = balance_losses(self.cfg, None if dummy else r, counts_E, B,  # a dummy row adds no statistics
                                 None if idx_np is None else idx_np // S, self._reduce) if self.training else None
            ids_TK = r.topk_ids_TK
        if dummy:
            yr_TH, aux = yr_TH * 0.0, None
        y_TH = yr_TH if idx is None else paddle.scatter(paddle.zeros_like(x_TH), idx, yr_TH, overwrite=True)
        if self.shared is not None:  # [B, S, H]: under sequence parallelism the shared experts gather along S
            y_TH = y_TH + self.shared(x_BSH).reshape([B * S, H])
        # not in recompute's no-grad first pass (one count per micro-batch), and not for a sub-model's
        # routing: the aux-free bias balances the full model only, so its loads alone move the bias
        if counting:
            self.step_counts += counts_E
            if modr_T is not None:
                m_T = modr_T.numpy()
                ids = ids_TK.numpy()
                keep = (m_T >= 0)[:, None] & (ids >= 0)  # isolated routing pads ids with -1
                np.add.at(self.modality_counts, (np.broadcast_to(m_T[:, None], ids.shape)[keep], ids[keep]), 1)
        return y_TH.reshape([B, S, H]), aux

    def _reduce(self, stats: np.ndarray) -> np.ndarray:
        """Balancing statistics summed over the TP ranks that routed other tokens (sequence parallelism)."""
        return sum_numpy(stats, self.tp)

    def _isolated(self, x_TH, modality_T):
        """Text/audio tokens -> text experts, image/video tokens -> vision experts; ids in the joint numbering."""
        vis_T = paddle.logical_or(modality_T == IMAGE, modality_T == VIDEO)
        y_TH = paddle.zeros_like(x_TH)
        counts, aux_terms = [], []
        groups = ((paddle.logical_not(vis_T), self.router, self.experts, self.cfg, 0),
                  (vis_T, self.vision_router, self.vision_experts, self.vision_cfg, self.cfg.num_experts))
        K = max(self.cfg.top_k, self.vision_cfg.top_k)
        ids_TK = paddle.full([x_TH.shape[0], K], -1, dtype="int64")
        for sel_T, router, experts_list, cfg, offset in groups:
            idx = paddle.nonzero(sel_T).flatten()
            if idx.shape[0] == 0:
                counts.append(np.zeros(cfg.num_experts, np.int64))
                continue
            y, r, c = self._routed(paddle.gather(x_TH, idx), router, experts_list, cfg)
            y_TH = paddle.scatter(y_TH, idx, y, overwrite=True)
            counts.append(c)
            ids = paddle.concat([r.topk_ids_TK + offset, paddle.full([idx.shape[0], K - cfg.top_k], -1, "int64")], 1) \
                if cfg.top_k < K else r.topk_ids_TK + offset
            ids_TK = paddle.scatter(ids_TK, idx, ids, overwrite=True)
            if self.training and (cfg.aux_loss_coef > 0 or cfg.z_loss_coef > 0):
                aux_terms.append(balance_losses(replace(cfg, seq_aux_loss_coef=0.0), r, c, 1))
        aux = paddle.add_n([a for a in aux_terms if a is not None]) if any(a is not None for a in aux_terms) else None
        return y_TH, aux, np.concatenate(counts), ids_TK

    @paddle.no_grad()
    def update_bias(self, rate: float, counts_E: np.ndarray) -> None:
        """Aux-free balancing: b_i += rate * sign(mean_load - load_i), within each router's expert group."""
        start = 0
        for router in self.routers():
            c = counts_E[start:start + router.cfg.num_experts]
            start += router.cfg.num_experts
            step = rate * np.sign(c.mean() - c)
            bias = router.e_score_correction_bias
            bias.set_value(bias + paddle.to_tensor(step, dtype="float32"))
