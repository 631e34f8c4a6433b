"""Per-device training memory on paper: weights, grads, Adam states and activations for a parallel layout.

Placement (world = data x tensor x pipeline; expert-parallel ranks are carved from the data ranks):
- Layers are split into `pipeline x virtual_pipeline` contiguous chunks (`ernie5.plan.layout`: the explicit
  `pipeline_layout`, or even counts with the extra layers late, or equal compute); stage s holds chunks s, s + P,
  s + 2P, ... The embedding and the
  modality inputs (multimodal models: visual projection / scale table, audio tables, patch merger) sit on
  stage 0; the final norm, the head, MTP and the modality heads on the last stage. With pipeline > 1 the last
  stage keeps its own copy of the embedding when the head is tied to it or MTP embeds its inputs (as Megatron
  does), and the multimodal inputs and heads are one module (`ModalityIO`) held whole on both end stages, as
  `build_model(cfg, stage=...)` builds them.
- Each device holds one tensor-parallel rank's share of its stage, counted as `build_model(cfg, tp=...)` builds
  it (`ernie5.plan.params`, `tensor`): q/o projections, the dense FFN, shared experts, embedding and untied
  head are divided by `parallel.tensor`; k/v projections too when tensor divides num_kv_heads, else each rank
  holds one kv head (replicated on tensor / num_kv_heads ranks); norms, routers, routed experts, MTP's input
  norms and projection, and the modality inputs and heads are replicated on every tensor rank. Routed experts
  (text and, with isolated routing, vision experts) are divided over `parallel.expert` (carved from the data
  ranks: every tensor rank of a stage holds the same expert shard).
- Weights are `param_dtype`, grads `grad_dtype`, except the layers the runtime keeps in fp32 under bf16 AMP
  (`ernie5.model.mixed_precision`: routers and every RMSNorm weight, `fp32_params`). Adam keeps an fp32 master copy
  (unless the weights already are fp32) and two fp32 moments: 12 (or 8) bytes per parameter. ZeRO-1
  (`sharding_stage: 1`) divides those by the parameter's data-parallel degree: `data` for dense parts,
  `data / expert` for routed experts. Grads and weights are not sharded by ZeRO-1.

Activations (bytes kept for backward per micro-batch; T = micro_batch_size x seq_len tokens, a = bytes of
param_dtype, everything / tensor under sequence parallelism (the default with tensor > 1; without it nothing is
divided, an upper bound); a fused (flash)
attention kernel is assumed, so no seq x seq matrix is kept):
- attention half of a block: norm input H*a (the layer input, always kept) + norm rstd 4 + norm output H*a
  + q, k, v (nq + 2 nkv) d a (nkv at least tensor: a rank keeps one kv head when they are replicated)
  + attention output nq d a + its log-sum-exp nq*4.
- dense FFN: norm input H*a + rstd 4 + norm output H*a + gate|up 2F*a + silu(gate)*up F*a.
- MoE FFN: norm input H*a + rstd 4 + norm output H*a + router probs E*4 + top-k ids and weights 12k
  + dispatched tokens kH*a + expert gate|up 2k Fe*a + expert products k Fe*a + expert outputs kH*a (for the
  combine-weight gradient) + shared gate|up 2Fs*a + shared products Fs*a (Fs = Fe x num_shared_experts).
  Isolated routing: each routed term is the larger of the text group's (E, k, Fe) and the vision group's
  (vision_num_experts, vision_top_k, vision_expert_ffn_size), a bound for any mix of modalities.
- FP8 storage (`precision.fp8.enabled` and `store_activations`): saved inputs of the FP8 GEMMs are kept as
  E4M3 bytes plus one fp32 scale per `tile` values, 1 + 4/tile bytes instead of a (half of bf16, a quarter of
  fp32). apply_to=experts: dispatched tokens and expert products; apply_to=all_linear: also every other GEMM
  input (norm outputs, attention output, dense/shared products). `quantize_dispatch` alone also stores the
  dispatched tokens in FP8 (they arrive quantised from the all-to-all).
- Recompute (layers in `recompute.layers`, all when unset): `full` keeps only the layer input H*a and
  re-runs the block in backward (one block's full activations of one micro-batch are live once per stage at
  that moment; counted); `selective` drops what the chosen modules re-create: attention -> the attention
  output and LSE; norm_qkv -> the attention norm output and q, k, v; expert_gate_up -> expert and shared
  gate|up outputs and products (MoE layers only).
- Head (last stage, one micro-batch): final norm input and output 2H*a + fp32 logits V*4 (vocab / tensor)
  for NTP and each MTP depth; each MTP depth adds its two norm inputs (embedding, hidden) 2H*a + 8, the
  projection input 2H*a and one dense block (not recomputed).
- In flight (1F1B, m = grad_accum_steps micro-batches): stage s keeps min(P - s, m) micro-batches; with
  v > 1 virtual stages, min(2(P - s - 1) + (v - 1)P + 1, m v) chunks of 1/v of its layers (Megatron's
  interleaved schedule). No pipeline: one micro-batch.
Not modelled: the modality inputs' and heads' activations (multimodal models; small next to the text
head's logits), communication buffers, all-to-all staging, allocator fragmentation, CUDA context (~1-3 GB);
keep 10-20% headroom.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ernie5.errors import ConfigError
from ernie5.model.pipeline import stage_layers  # the runtime builds the same stages
from ernie5.plan.layout import chunk_sizes
from ernie5.model.config import ModelConfig
from ernie5.plan.params import (ParamCount, _merger_params, _mtp_depth_params, embedding_params, head_params,
                                layer_params, modality_head_params, modality_input_params, mtp_params)

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# components divided over expert-parallel ranks (on top of the tensor-rank count, where they are replicated);
# isolated routing runs with expert = 1, so its vision experts are whole on every rank
EXPERT_COMPONENTS = {"experts", "vision_experts"}
# components kept and trained in fp32 whatever param_dtype is: the weights of the layers Paddle's AMP O2 leaves
# in fp32 (`ernie5.model.mixed_precision`: Router, RMSNorm); MTP depths and the patch merger hold RMSNorms too
FP32_COMPONENTS = {"router", "norms"}


def resolve_data(run_cfg, devices: int | None = None):
    """(run_cfg with parallel.data set, note). A null `parallel.data` (the launcher decides) is planned as
    devices / (tensor x pipeline) when `devices` is given, else as `expert` (the smallest legal degree)."""
    p = run_cfg.parallel
    if p.data is not None:
        return run_cfg, ""
    per_replica = p.tensor * p.pipeline
    if devices:
        data = devices // per_replica
        if data * per_replica != devices or data % p.expert:
            raise ConfigError("--devices", f"{devices} is not a multiple of tensor x pipeline = {per_replica} "
                                           f"with a data-parallel degree divisible by expert {p.expert}")
        note = f"parallel.data is null: planned as --devices {devices} / (tensor x pipeline) = {data}"
    else:
        data = p.expert
        note = f"parallel.data is null: planned as data = expert = {data} (pass --devices to plan another size)"
    return dataclasses.replace(run_cfg, parallel=dataclasses.replace(p, data=data)), note


def check_layout(run_cfg) -> None:
    """Raise ConfigError when the layout cannot shard this model's shapes evenly. The tensor-parallel shape rules
    (heads, kv heads, FFN and shared-expert widths) are `check_tensor_parallel`'s, run when the RunConfig is
    validated; the vocabulary one is checked at run start, once the vocabulary is known (as here)."""
    m, p = run_cfg.model, run_cfg.parallel
    if p.tensor > 1 and (m.vocab_size or 0) % p.tensor:
        raise ConfigError("model.vocab_size", f"{m.vocab_size} is not divisible by parallel.tensor {p.tensor}")
    chunks = p.pipeline * p.virtual_pipeline
    if m.num_layers < chunks:
        raise ConfigError("parallel.pipeline", f"{p.pipeline} x virtual_pipeline {p.virtual_pipeline} = {chunks} "
                                               f"chunks > model.num_layers {m.num_layers}")
    if m.moe.num_experts and m.moe.num_experts % p.expert:
        raise ConfigError("parallel.expert", f"{p.expert} does not divide model.moe.num_experts {m.moe.num_experts}")


def stage_params(cfg: ModelConfig, layers: list[int], first: bool, last: bool, pipeline: int,
                 tensor: int = 1) -> ParamCount:
    """Parameters of one tensor rank of one pipeline stage (every routed expert of it: `_per_device` divides
    them over the expert ranks); `tensor` 1: the whole stage."""
    pc = ParamCount()
    # the last stage's own embedding copy: the tied head and MTP's input embeddings read it
    if first or (last and pipeline > 1 and (cfg.tie_embeddings or cfg.mtp.depth > 0)):
        pc.merge(embedding_params(cfg, tensor=tensor))
    if first or last:  # ModalityIO (inputs and heads in one module) sits whole on both ends
        pc.merge(modality_input_params(cfg))
    for i in layers:
        pc.merge(layer_params(cfg, i, tensor=tensor))
    if last:
        pc.merge(head_params(cfg, tensor=tensor)).merge(mtp_params(cfg, tensor=tensor))
    if first or last:
        pc.merge(modality_head_params(cfg))
    return pc


def fp32_params(cfg: ModelConfig, name: str, count: int, tensor: int = 1) -> int:
    """How many of component `name`'s `count` parameters (one tensor rank's) are fp32 whatever param_dtype is:
    routers and norms whole, each MTP depth's four RMSNorms (two input norms, its block's two), the patch
    merger's two RMSNorms."""
    H = cfg.hidden_size
    if name in FP32_COMPONENTS:
        return count
    if name == "mtp" and count:
        return count // _mtp_depth_params(cfg, tensor) * 4 * H
    if name == "patch_merger" and count:
        return count // _merger_params(cfg) * 2 * H
    return 0


def _per_device(name: str, count: int, expert: int) -> int:
    """A tensor rank's count of component `name` on one device: routed experts divided over the expert ranks."""
    return math.ceil(count / expert) if name in EXPERT_COMPONENTS else count


def state_bytes(pc: ParamCount, run_cfg, param_dtype: str, grad_dtype: str) -> dict[str, int]:
    """Weights, grads and Adam states of one device of the stage whose one-tensor-rank parameters are `pc`
    (`stage_params(..., tensor=parallel.tensor)`); `params` is the device's exact parameter count."""
    p = run_cfg.parallel
    out = {"params": 0, "params_bytes": 0, "grads_bytes": 0, "optimizer_bytes": 0}
    for name, count in pc.total.items():
        n = _per_device(name, count, p.expert)
        dp = p.data // p.expert if name in EXPERT_COMPONENTS else p.data
        n32 = fp32_params(run_cfg.model, name, n, p.tensor)
        for k, w, g in ((n32, 4, 4), (n - n32, DTYPE_BYTES[param_dtype], DTYPE_BYTES[grad_dtype])):
            adam = 8 + (4 if w < 4 else 0)  # fp32 weights are their own master copy
            out["params"] += k
            out["params_bytes"] += k * w
            out["grads_bytes"] += k * g
            out["optimizer_bytes"] += math.ceil(k * adam / (dp if p.sharding_stage >= 1 else 1))
    return out


def _fp8_bytes(run_cfg, a: int, kind: str) -> float:
    """Bytes per element of a saved GEMM input of `kind` ('expert', 'dispatch' or 'linear')."""
    f = run_cfg.precision.fp8
    if not f.enabled:
        return a
    fp8 = 1 + 4 / f.tile
    if kind == "dispatch" and f.quantize_dispatch:
        return fp8
    if not f.store_activations:
        return a
    if kind in ("expert", "dispatch") or f.apply_to == "all_linear":
        return fp8
    return a


def block_pieces(run_cfg, moe: bool, a: int) -> dict[str, float]:
    """Bytes per token (before / tensor) a block saves for backward, by the piece recompute can drop."""
    m = run_cfg.model
    # under TP with fewer kv heads than ranks each rank still computes one kv head (replicated)
    H, d, nq, nkv = m.hidden_size, m.dim_head, m.num_heads, max(m.num_kv_heads, run_cfg.parallel.tensor)
    lin = _fp8_bytes(run_cfg, a, "linear")
    pieces = {
        "inputs": 2 * (H * a + 4),  # the two norm inputs (the first is the layer input) and their fp32 rstd
        "norm_qkv": H * lin + (nq + 2 * nkv) * d * a,  # attention norm output, q, k, v
        "attention": nq * d * lin + nq * 4,  # attention output (o_proj input) and fp32 log-sum-exp
        "ffn_norm": H * lin,  # FFN norm output (gate|up / router / dispatch input)
    }
    if moe:
        mo = m.moe
        k, Fe, Fs = mo.top_k, mo.expert_ffn_size, mo.expert_ffn_size * mo.num_shared_experts
        E, kFe = mo.num_experts, k * Fe
        if mo.isolated:  # a token uses one group: bound by the larger one
            E, k = max(E, mo.vision_num_experts), max(k, mo.vision_k)
            kFe = max(kFe, mo.vision_k * mo.vision_expert_ffn_size)
        pieces["expert_gate_up"] = 2 * kFe * a + kFe * _fp8_bytes(run_cfg, a, "expert") + 2 * Fs * a + Fs * lin
        pieces["moe_rest"] = E * 4 + 12 * k + k * H * _fp8_bytes(run_cfg, a, "dispatch") + k * H * a
    else:
        F = m.ffn_hidden_size
        pieces["dense_ffn"] = 2 * F * a + F * lin
    return pieces


def layer_activation_bytes(run_cfg, i: int, a: int) -> tuple[float, float]:
    """(kept, full) activation bytes of layer i for one micro-batch on one device; `kept` applies recompute."""
    m, rc = run_cfg.model, run_cfg.recompute
    T = run_cfg.train.micro_batch_size * run_cfg.data.seq_len
    pieces = block_pieces(run_cfg, m.is_moe_layer(i), a)
    full = sum(pieces.values())
    kept = full
    if rc.applies_to(i):
        if rc.mode == "full":
            kept = m.hidden_size * a  # the block input is the checkpoint
        else:
            kept = full - sum(pieces.get(mod, 0) for mod in set(rc.modules))
    t = activation_split(run_cfg)
    return T * kept / t, T * full / t


def activation_split(run_cfg) -> int:
    """What activations are divided by: the tensor degree under sequence parallelism; 1 without it (an upper
    bound: norms, residuals and the replicated experts then see every token on every tensor rank, and only the
    split GEMMs' intermediates are smaller)."""
    p = run_cfg.parallel
    return p.tensor if p.sequence_parallel_on else 1


def head_activation_bytes(run_cfg, a: int) -> float:
    """Last stage, one micro-batch: final norm + fp32 logits per head, and the MTP depths."""
    m = run_cfg.model
    T, H, V = run_cfg.train.micro_batch_size * run_cfg.data.seq_len, m.hidden_size, m.vocab_size or 0
    lin = _fp8_bytes(run_cfg, a, "linear")
    per_head = H * a + 4 + H * lin + V * 4
    mtp = 2 * (H * a + 4) + 2 * H * lin + sum(block_pieces(run_cfg, False, a).values())
    return T * (per_head * (1 + m.mtp.depth) + mtp * m.mtp.depth) / activation_split(run_cfg)


def in_flight(stage: int, pipeline: int, virtual: int, micro_batches: int) -> float:
    """Micro-batches' worth of a stage's layer activations alive at the 1F1B peak."""
    if pipeline == 1:
        return 1.0
    if virtual == 1:
        return float(min(pipeline - stage, micro_batches))
    chunks = min(2 * (pipeline - stage - 1) + (virtual - 1) * pipeline + 1, micro_batches * virtual)
    return chunks / virtual


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 12, 13] -> '0-2,12-13'."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "-"


def _recompute_text(rc) -> str:
    if rc.mode == "none":
        return "none"
    what = "full" if rc.mode == "full" else f"selective {list(rc.modules)}"
    return f"{what} on {'all layers' if rc.layers is None else f'layers {rc.layers}'}"


def memory_plan(run_cfg, param_dtype: str = "bf16", grad_dtype: str = "fp32") -> dict[str, Any]:
    """Per-stage and worst-stage bytes per device; `memory_per_device_bytes` is the worst stage's total."""
    for opt, value in (("--param-dtype", param_dtype), ("--grad-dtype", grad_dtype)):
        if value not in DTYPE_BYTES:
            raise ConfigError(opt, f"{value!r} is not one of {', '.join(DTYPE_BYTES)}")
    run_cfg, note = resolve_data(run_cfg)
    m, p = run_cfg.model, run_cfg.parallel
    a = DTYPE_BYTES[param_dtype]
    stages = []
    for s, layers in enumerate(stage_layers(m.num_layers, p.pipeline, p.virtual_pipeline, chunk_sizes(run_cfg))):
        first, last = s == 0, s == p.pipeline - 1
        st = state_bytes(stage_params(m, layers, first, last, p.pipeline, p.tensor), run_cfg, param_dtype,
                         grad_dtype)
        acts = [layer_activation_bytes(run_cfg, i, a) for i in layers]
        fly = in_flight(s, p.pipeline, p.virtual_pipeline, run_cfg.train.grad_accum_steps)
        act = fly * sum(k for k, _ in acts)
        full_recomputed = [f for i, (_, f) in zip(layers, acts)
                           if run_cfg.recompute.mode == "full" and run_cfg.recompute.applies_to(i)]
        act += max(full_recomputed, default=0)  # the block being re-run in backward
        if last:
            act += head_activation_bytes(run_cfg, a)
        act = math.ceil(act)
        stages.append({"stage": s, "layers": _ranges(layers), **st,
                       "activations_bytes": act, "in_flight": fly,
                       "total_bytes": st["params_bytes"] + st["grads_bytes"] + st["optimizer_bytes"] + act})
    worst = max(stages, key=lambda x: x["total_bytes"])
    rc, f8 = run_cfg.recompute, run_cfg.precision.fp8
    return {
        "memory_per_device_bytes": worst["total_bytes"],
        "worst_stage": worst,
        "per_stage": stages,
        "param_dtype": param_dtype,
        "grad_dtype": grad_dtype,
        "recompute": _recompute_text(rc),
        "fp8": ("off" if not f8.enabled else
                f"E4M3 on {f8.apply_to}, store_activations={f8.store_activations}, "
                f"quantize_dispatch={f8.quantize_dispatch}"),
        "note": note,
        "layout": {"data": p.data, "tensor": p.tensor, "pipeline": p.pipeline, "virtual_pipeline": p.virtual_pipeline,
                   "expert": p.expert, "sharding_stage": p.sharding_stage, "world_size": p.world_size,
                   "micro_batch_size": run_cfg.train.micro_batch_size,
                   "micro_batches": run_cfg.train.grad_accum_steps},
    }
