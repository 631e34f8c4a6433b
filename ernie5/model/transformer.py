"""The decoder-only backbone: embeddings -> pre-norm blocks (attention + dense FFN or MoE) -> tied head; MTP."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import paddle
import paddle.nn as nn

from ernie5.comm.regions import TPGroup, gather_seq_replicated, reduce_from, scatter_seq
from ernie5.model.attention import Attention, KVCache, group_mask, key_spans_of
from ernie5.model.config import ModelConfig
from ernie5.model.layers import Linear, RMSNorm, checkpointed, linear
from ernie5.model.moe import ExpertPlacement, MoELayer
from ernie5.model.multimodal import ModalityIO
from ernie5.model.pipeline import PipelineStage
from ernie5.model.probe import NO_PROBE, Probe, attach
from ernie5.model.rope import frequency_table, rope_cos_sin
from ernie5.model.tensor_parallel import ParallelSwiGLU, VocabEmbedding, mark_sequence_parallel, sharded_linear, \
    tp_shard
from ernie5.precision.bf16 import bf16_linear
from ernie5.precision.config import FP8Config, RecomputeConfig


class Block(nn.Layer):
    """x + attn(norm(x)), then + ffn(norm(x)); the FFN is dense or MoE. Returns (x, aux loss or None).

    Recompute (training only): `full` re-runs the whole block in backward; `selective` re-runs only the chosen
    pieces: `norm_qkv` (input norm + q/k/v projections + RoPE), `attention` (the softmax(qk^T)v core),
    `expert_gate_up` (routed and shared experts' gate/up GEMMs and activation).

    Under tensor parallelism (`tp`) attention and the FFN are split over the TP ranks (`Attention`,
    `ParallelSwiGLU`, `MoELayer`); with sequence parallelism the block's input, norms and residuals are this
    rank's sequence shard.
    """

    probe = NO_PROBE  # the attention's q/k/v and core steps run through it (`ernie5.model.probe`)

    def __init__(self, cfg: ModelConfig, moe: bool, recompute: Optional[RecomputeConfig] = None, index: int = 0,
                 placement: Optional[ExpertPlacement] = None, seed: int = 0, tp: Optional[TPGroup] = None):
        super().__init__()
        on = recompute is not None and recompute.applies_to(index)
        self.full_recompute = on and recompute.mode == "full"
        self.selective = set(recompute.modules) if on and recompute.mode == "selective" else set()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, tp)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        mark_sequence_parallel(self.input_norm, tp)
        mark_sequence_parallel(self.post_attn_norm, tp)
        self.is_moe = moe
        self.mlp = (MoELayer(cfg, placement, "expert_gate_up" in self.selective, index, seed, tp) if moe
                    else ParallelSwiGLU(cfg.hidden_size, cfg.ffn_hidden_size, cfg.init_std, tp))

    def _norm_qkv(self, x_BSH, cos, sin):
        return self.probe.run("attention", "qkv", self.attn.qkv, self.input_norm(x_BSH), cos, sin)

    def _core(self, q, k, v, mask, spans=None):
        return self.probe.run("attention", "core", self.attn.core, q, k, v, mask, spans)

    def _attention(self, x_BSH, cos, sin, mask, kv=None, spans=None):
        """`spans`: the mask's key spans (`attention.key_spans_of`), read before recompute copies the mask."""
        spans = spans if spans is not None else key_spans_of(mask)
        if kv is not None:  # incremental decoding: new positions' keys / values join the cached ones
            q, k, v = self._norm_qkv(x_BSH, cos, sin)
            return self.attn.out(self._core(q, *kv(k, v), mask, spans))
        replay = self.training
        q, k, v = (checkpointed(self._norm_qkv, x_BSH, cos, sin) if replay and "norm_qkv" in self.selective
                   else self._norm_qkv(x_BSH, cos, sin))
        o = (checkpointed(self._core, q, k, v, mask, spans) if replay and "attention" in self.selective
             else self._core(q, k, v, mask, spans))
        return self.attn.out(o)

    def _forward(self, x_BSH, cos, sin, mask, submodel=None, modality_BS=None, kv=None, spans=None):
        x_BSH = x_BSH + self._attention(x_BSH, cos, sin, mask, kv, spans)
        h = self.post_attn_norm(x_BSH)
        if self.is_moe:
            y, aux = self.mlp(h, submodel, modality_BS)
            return x_BSH + y, aux
        return x_BSH + self.mlp(h), None

    def forward(self, x_BSH, cos, sin, mask, submodel=None, modality_BS=None, kv=None):
        """`submodel`: an elastic SubModel whose expert subset / top-k the MoE layer routes with (None: full).
        `modality_BS` (unified batches): per-token modality, for isolated routing and per-modality loads.
        `kv` (incremental decoding): kv(k, v) stores this layer's new keys / values and returns all of them."""
        if kv is not None or not (self.full_recompute and self.training):
            return self._forward(x_BSH, cos, sin, mask, submodel, modality_BS, kv)
        has_aux = self.is_moe and self.mlp.has_aux
        spans = key_spans_of(mask)  # the recomputed copy of the mask will not carry them

        def run(x, c, s, m):  # recompute wants tensor outputs only
            y, aux = self._forward(x, c, s, m, submodel, modality_BS, spans=spans)
            return (y, aux) if has_aux else y

        out = checkpointed(run, x_BSH, cos, sin, mask)
        return out if has_aux else (out, None)

    def forward_rows(self, x_BSH, cos, sin, mask, rows: "QueryRows") -> paddle.Tensor:
        """A dense block's output [B, Q, H] at the positions `rows` picks alone; keys and values still come from
        every position. Equal to `forward` at those positions: a query reads its own row of the mask, and all
        after attention works position by position. (The q projection runs on every position and is then
        picked: one small GEMM, and RoPE needs no gathered cos / sin.)"""
        if self.is_moe:
            raise ValueError("forward_rows is for dense blocks (the MTP block)")
        q, k, v = self._norm_qkv(x_BSH, cos, sin)
        x_BQH = rows.take(x_BSH) + self.attn.out(self._core(rows.take(q), k, v, rows.take_mask(mask)))
        return x_BQH + self.mlp(self.post_attn_norm(x_BQH))


@dataclass
class QueryRows:
    """N positions of a [B, S] batch laid out as [B, Q] for attention (Q: the most positions any row has). A
    row with fewer repeats its last position (a row with none, its first); `keep` drops the repeats again and
    returns the N positions in flat order (b * S + s ascending), the order `from_flat` was given them in."""

    take_idx: paddle.Tensor  # int64 [B * Q]: flat position b * S + s of each [B, Q] slot
    keep_idx: paddle.Tensor  # int64 [N]: the slots that hold a real position, in flat order
    B: int
    S: int
    Q: int

    @classmethod
    def from_flat(cls, flat_N: paddle.Tensor, B: int, S: int) -> "QueryRows":
        """`flat_N`: ascending flat positions b * S + s (what `paddle.nonzero` of a flattened [B, S] mask gives)."""
        flat = flat_N.numpy().astype(np.int64).reshape(-1)
        if flat.size and np.any(np.diff(flat) <= 0):
            raise ValueError("QueryRows.from_flat wants strictly ascending positions")
        row = flat // S
        counts = np.bincount(row, minlength=B)
        Q = max(int(counts.max(initial=0)), 1)
        slot = np.arange(flat.size) - (np.cumsum(counts) - counts)[row]  # index of each position inside its row
        take = np.repeat(np.arange(B, dtype=np.int64)[:, None] * S, Q, axis=1)
        take[row, slot] = flat
        for b in np.nonzero((counts > 0) & (counts < Q))[0]:
            take[b, counts[b]:] = take[b, counts[b] - 1]
        place = flat_N.place
        return cls(paddle.to_tensor(take.reshape(-1), place=place), paddle.to_tensor(row * Q + slot, place=place),
                   B, S, Q)

    def take(self, t_BS_: paddle.Tensor) -> paddle.Tensor:
        """[B, S, ...] -> [B, Q, ...]."""
        rest = list(t_BS_.shape[2:])
        return paddle.gather(t_BS_.reshape([self.B * self.S] + rest), self.take_idx).reshape([self.B, self.Q] + rest)

    def take_mask(self, mask_B1SK: paddle.Tensor) -> paddle.Tensor:
        """Additive mask [B or 1, 1, S, K] -> the picked queries' rows [B, 1, Q, K]."""
        K = mask_B1SK.shape[-1]
        m = mask_B1SK.expand([self.B, 1, self.S, K]) if mask_B1SK.shape[0] != self.B else mask_B1SK
        return self.take(m.reshape([self.B, self.S, K])).unsqueeze(1)

    def keep(self, t_BQ_: paddle.Tensor) -> paddle.Tensor:
        """[B, Q, ...] -> [N, ...]: the real positions, in flat order."""
        rest = list(t_BQ_.shape[2:])
        return paddle.gather(t_BQ_.reshape([self.B * self.Q] + rest), self.keep_idx)


class MTPModule(nn.Layer):
    """One multi-token-prediction depth: h' = Block(Linear_{2H->H}(concat(Norm(embed(x_{t+k})), Norm(h_t)))).

    Inputs and output are whole sequences; under sequence parallelism the module works on this rank's shard
    in between, like a backbone block (its norms and projection replicated, the block split)."""

    def __init__(self, cfg: ModelConfig, tp: Optional[TPGroup] = None):
        super().__init__()
        self.tp = tp
        self.emb_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.proj = linear(2 * cfg.hidden_size, cfg.hidden_size, cfg.init_std)
        for part in (self.emb_norm, self.hidden_norm, self.proj):
            mark_sequence_parallel(part, tp)
        self.block = Block(cfg, moe=False, tp=tp)

    def forward(self, h_BSH, emb_BSH, cos, sin, mask, rows: Optional[QueryRows] = None):
        """`emb_BSH`: the input embeddings of the positions one step ahead. `rows` (optional): return only those
        positions' outputs, [N, H] in flat order, with the block's queries computed there alone (under sequence
        parallelism the whole block runs and the rows are picked after)."""
        sp = self.tp is not None and self.tp.sequence_parallel
        if sp:
            h_BSH, emb_BSH = scatter_seq(h_BSH, self.tp), scatter_seq(emb_BSH, self.tp)
        x = self.proj(paddle.concat([self.emb_norm(emb_BSH), self.hidden_norm(h_BSH)], axis=-1))
        if rows is not None and not sp:
            return rows.keep(self.block.forward_rows(x, cos, sin, mask, rows))
        y = self.block(x, cos, sin, mask)[0]
        y = gather_seq_replicated(y, self.tp) if sp else y
        return y if rows is None else rows.keep(rows.take(y))


class OnAnotherStage(nn.Layer):
    """The place of a block that another pipeline stage holds (keeps `layers.{i}` names global)."""

    is_moe = False
    present = False


def _layer_seed(seed: int, part: int) -> int:
    """The generator seed each block (part = layer + 1), the model's tail (norm, head, MTP: num_layers + 1) and the
    modality inputs / heads (num_layers + 2) are built from: every pipeline stage draws its parts' weights as one
    process does, whichever parts it skips."""
    return seed * 1_000_003 + 7_919 * part


@dataclass
class BackboneOut:
    hidden_BSH: paddle.Tensor  # last block output, before the final norm
    aux_loss: Optional[paddle.Tensor]
    cos: paddle.Tensor
    sin: paddle.Tensor
    mask: paddle.Tensor


class UnifiedModel(nn.Layer):
    """The ernie5 transformer. `forward(input_ids)` returns text logits [B, S, V].

    `tp` (a `TPGroup`): this model is one tensor-parallel rank's share (Megatron-style; see
    `ernie5.comm.regions` and `ernie5.model.tensor_parallel`). The embedding and the text head are split by
    vocabulary (logits are then this rank's vocabulary slice: `ernie5.objectives.vocab_parallel` reduces the
    cross-entropy over the group); the modality inputs and heads are replicated and see the whole sequence.
    Under sequence parallelism the blocks see sequence shards; `backbone` returns whole sequences."""

    probe = NO_PROBE  # RoPE tables and the attention mask run through it, and so does the objectives' head loss
    head_bf16 = None  # PrecisionConfig (`ernie5.model.mixed_precision.enable_bf16`): the tied head as an emulated bf16 GEMM

    def __init__(self, cfg: ModelConfig, recompute: Optional[RecomputeConfig] = None,
                 placement: Optional[ExpertPlacement] = None, seed: int = 0, tp: Optional[TPGroup] = None,
                 stage: Optional[PipelineStage] = None, reseed: bool = False):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved before building the model")
        self.cfg = cfg
        self.tp = tp if tp is not None and tp.active else None
        self.stage = stage if stage is not None and stage.size > 1 else None
        first, last = self.stage is None or self.stage.first, self.stage is None or self.stage.last
        # the last stage keeps its own copy of the embedding for a tied head and for MTP's input embeddings
        self.embed = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.init_std, self.tp) \
            if first or (last and (cfg.tie_embeddings or cfg.mtp.depth)) else None
        blocks = []
        for i in range(cfg.num_layers):
            if reseed:
                paddle.seed(_layer_seed(seed, i + 1))
            held = self.stage is None or self.stage.holds(i)
            blocks.append(Block(cfg, cfg.is_moe_layer(i), recompute, i, placement, seed, self.tp) if held
                          else OnAnotherStage())
        self.layers = nn.LayerList(blocks)
        if reseed:
            paddle.seed(_layer_seed(seed, cfg.num_layers + 1))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if last else None
        self.lm_head = None if cfg.tie_embeddings or not last else \
            sharded_linear(cfg.hidden_size, cfg.vocab_size, cfg.init_std, tp_shard(self.tp, axis=1))
        self.mtp = nn.LayerList([MTPModule(cfg, self.tp) for _ in range(cfg.mtp.depth if last else 0)])
        # non-text inputs (first stage) and heads (last stage) are one module: both ends hold it
        if reseed:
            paddle.seed(_layer_seed(seed, cfg.num_layers + 2))
        self.io = ModalityIO(cfg) if cfg.multimodal.enabled and (first or last) else None
        table = frequency_table(cfg.dim_head, cfg.rope_theta, cfg.sections_thw)
        self.register_buffer("rope_table", paddle.to_tensor(table), persistable=False)

    def set_probe(self, probe: Probe) -> None:
        """Run the model's probed steps through `probe` (on this model and every sublayer that has a `probe`);
        `NO_PROBE` takes it off again. See `ernie5.model.probe`."""
        attach(self, probe)

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers this model (this pipeline stage) holds."""
        return [b.mlp for b in self.layers if b.is_moe]

    def backbone(self, input_ids_BS, pos_thw_BS3=None, segment_ids_BS=None, submodel=None, *, embeds_BSH=None,
                 groups_BS=None, modality_BS=None, cache: Optional[KVCache] = None, pipe_in=None, until_BS=None,
                 chunk: int = 0) -> BackboneOut:
        """`submodel` (elastic training): layers it does not keep are identities; MoE layers route with its
        expert subset and top-k. None: the full model.

        Unified batches pass `embeds_BSH` (from `embed_unified`, instead of `input_ids_BS`), `groups_BS` (attention
        is causal across groups, bidirectional inside one; None: one group per position), `modality_BS` and
        optionally `until_BS` (a key is hidden from queries of group >= its `until`: windowed video attention).

        `cache` (a `KVCache`, incremental decoding): the inputs are only the new positions; they attend to the
        cached ones too (the mask follows the same document / group rule) and their keys / values are added.
        Default positions then continue after the cached ones. The returned mask covers new x all positions.

        Pipeline stages after the first pass `pipe_in`, the previous stage's output as sent (a sequence shard
        under sequence parallelism; `embeds_BSH` / `input_ids_BS` then only give the shape), and every stage
        but the last returns its blocks' output in that form for the next stage. With interleaving, `chunk` is
        the local chunk to run (each is a stage of its own in this sense)."""
        first = self.stage is None or self.stage.starts_model(chunk)
        last = self.stage is None or self.stage.ends_model(chunk)
        run_layers = None if self.stage is None else set(self.stage.chunk_layers(chunk))
        if first:
            x = self.embed(input_ids_BS) if embeds_BSH is None else embeds_BSH
            B, S = x.shape[:2]
        else:  # the batch's shape from its document ids (every caller passes them)
            x = pipe_in
            B, S = segment_ids_BS.shape[:2]
        start = cache.length if cache is not None else 0
        if pos_thw_BS3 is None:
            pos_thw_BS3 = paddle.arange(start, start + S, dtype="int64").reshape([1, S, 1]).expand([B, S, 3])
        if segment_ids_BS is None:
            segment_ids_BS = paddle.zeros([B, S], dtype="int64")
        run = self.probe.run
        cos, sin = run("norms_rope", "rope_cos_sin", rope_cos_sin, pos_thw_BS3, self.rope_table)
        mask = (run("attention", "group_mask", group_mask, segment_ids_BS, groups_BS, until_BS) if cache is None
                else cache.extend(segment_ids_BS, groups_BS, until_BS))
        sp = self.tp is not None and self.tp.sequence_parallel
        if sp:  # the blocks work on this rank's sequence shard
            if first:
                x = scatter_seq(x, self.tp)
            if modality_BS is not None:
                a, b = self.tp.seq_slice(S)
                modality_BS = modality_BS[:, a:b]
        aux_terms = []
        for i, block in enumerate(self.layers):
            if run_layers is not None and i not in run_layers:
                continue  # another stage's, or another chunk's
            if submodel is not None and not submodel.keeps_layer(i):
                continue
            kv = None if cache is None else functools.partial(cache.append, i)
            x, aux = block(x, cos, sin, mask, submodel, modality_BS, kv)
            if aux is not None:
                aux_terms.append(aux)
        aux_loss = paddle.add_n(aux_terms) if aux_terms else None
        if sp:
            if last:
                x = gather_seq_replicated(x, self.tp)
            if self.training and any(self.layers[i].is_moe and self.layers[i].mlp.has_aux for i in
                                     (run_layers if run_layers is not None else range(len(self.layers)))):
                # each rank's balancing losses are its shard's share of the batch's (`balance_losses`): the sum
                # over the group is the loss; every rank joins even if its shard routed nothing
                aux_loss = reduce_from(aux_loss if aux_loss is not None else paddle.zeros([]), self.tp)
        return BackboneOut(x, aux_loss, cos, sin, mask)

    def logits(self, hidden_BSH: paddle.Tensor) -> paddle.Tensor:
        """Final norm + output head (tied to the embedding unless tie_embeddings is false)."""
        return self.logits_from_normed(self.norm(hidden_BSH))

    def head_weight(self):
        """(weight, weight is [V, H]) of the text head as one plain matrix (the tied embedding, or the head's own
        [H, V] weight), or (None, False) when the head is not a plain GEMM (FP8): what fused heads consume."""
        if self.lm_head is None:  # (under TP the vocab-parallel CE rounds the operands itself)
            return (None, False) if self.head_bf16 is not None and self.tp is None else (self.embed.weight, True)
        plain = getattr(self.lm_head, "fp8", None) is None and getattr(self.lm_head, "bf16", None) is None
        if plain or (self.tp is not None and getattr(self.lm_head, "fp8", None) is None):
            return self.lm_head.weight, False
        return None, False

    def logits_from_normed(self, h: paddle.Tensor) -> paddle.Tensor:
        """The text head on already normalised hidden states (under TP: this rank's vocabulary slice)."""
        if self.lm_head is None:
            if self.head_bf16 is not None:
                return bf16_linear(h, self.embed.weight, transpose_w=True, fp32_wgrad=self.head_bf16.grad_allreduce_fp32)
            return paddle.matmul(h, self.embed.weight, transpose_y=True)
        return self.lm_head(h)

    def mtp_hidden(self, depth: int, prev_BSH, next_emb_BSH, out: BackboneOut,
                   rows: Optional[QueryRows] = None) -> paddle.Tensor:
        """Hidden state of MTP depth `depth` (1-based) from the previous depth's hidden and the input embedding
        of x_{t+depth}: [B, S, H], or [N, H] at the positions `rows` picks (`MTPModule`)."""
        return self.mtp[depth - 1](prev_BSH, next_emb_BSH, out.cos, out.sin, out.mask, rows)

    def embed_unified(self, batch: dict) -> paddle.Tensor:
        """Input vectors of a unified (multimodal) batch."""
        if self.io is None:
            raise ValueError("this model has no multimodal inputs (model.multimodal.enabled is false)")
        return self.io.embed(self.embed, batch)

    def forward(self, input_ids_BS, pos_thw_BS3=None, segment_ids_BS=None, submodel=None) -> paddle.Tensor:
        return self.logits(self.backbone(input_ids_BS, pos_thw_BS3, segment_ids_BS, submodel).hidden_BSH)


def enable_fp8(model, cfg: FP8Config) -> int:
    """Mark the linears the recipe covers: routed + shared experts, or (`all_linear`) every linear inside the
    blocks and MTP modules. Embeddings, the output head and the fp32 router stay out. Returns how many."""
    scopes = [m for m in model.sublayers() if isinstance(m, MoELayer)] if cfg.apply_to == "experts" else \
        list(model.layers) + list(model.mtp)
    count = 0
    for scope in scopes:
        for m in scope.sublayers(include_self=True):
            if isinstance(m, Linear) and (cfg.apply_to != "experts" or m is not getattr(scope, "router", None)):
                m.fp8 = cfg
                count += 1
    return count


def build_model(cfg: ModelConfig, seed: Optional[int] = None, recompute: Optional[RecomputeConfig] = None,
                placement: Optional[ExpertPlacement] = None, fp8: Optional[FP8Config] = None,
                tp: Optional[TPGroup] = None, stage: Optional[PipelineStage] = None) -> UnifiedModel:
    """Build with a fixed parameter-init seed (paddle.seed) so runs are reproducible; `fp8` (if enabled) puts
    the covered linears under the blockwise FP8 recipe; `tp`: this tensor-parallel rank's share."""
    if seed is not None:
        paddle.seed(seed)
    model = UnifiedModel(cfg, recompute, placement, seed or 0, tp, stage, reseed=seed is not None)
    if fp8 is not None and fp8.enabled:
        enable_fp8(model, fp8)
        for layer in model.moe_layers():
            layer.fp8 = fp8
    return model


def count_params(model: nn.Layer) -> int:
    return int(sum(math.prod(p.shape) for p in model.parameters()))


def to_tensor_batch(batch: dict[str, np.ndarray]) -> dict[str, paddle.Tensor]:
    return {k: paddle.to_tensor(v) for k, v in batch.items()}
