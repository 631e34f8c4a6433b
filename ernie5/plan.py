"""Model size and FLOPs on paper, from the config alone (no tensors are built).

FLOPs per token (training) follow the PaLM accounting: 6 x (matmul parameters a token passes through: attention
projections, dense FFN or its top-k experts + shared experts, router, output head for NTP and every MTP depth)
+ 12 x layers x seq_len x (heads x head_dim) for attention scores and values (causal masking not subtracted).
`mfu` in metrics.jsonl and `ernie5 bench` use this same number.

The count is assembled from pieces (embeddings, one piece per layer, final norm + head, MTP depths, modality
heads) so the memory planner (`ernie5.plan_memory`) can place each piece on its pipeline stage. The full report
behind `ernie5 plan` is `plan_report`; memory lives in `plan_memory`, the allocation-free build check in
`plan_lazy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ernie5.model.config import ModelConfig

# Defaults for tokens/day: H100 / H800 SXM dense bf16 peak and an MFU typical of large MoE runs
# (ERNIE 4.5 reports 47% on H800 for 300B-A47B; 40% leaves room for a less tuned stack).
DEFAULT_DEVICE_TFLOPS = 989.0
DEFAULT_MFU = 0.4
DEFAULT_DEVICE_MEMORY_GB = 80.0


@dataclass
class ParamCount:
    """Parameters per component: `total` counts every expert, `active` the ones one token uses."""

    total: dict[str, int] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, total: int, active: int | None = None) -> None:
        self.total[name] = self.total.get(name, 0) + total
        self.active[name] = self.active.get(name, 0) + (total if active is None else active)

    def merge(self, other: "ParamCount") -> "ParamCount":
        for name in other.total:
            self.add(name, other.total[name], other.active[name])
        return self

    @property
    def total_params(self) -> int:
        return sum(self.total.values())

    @property
    def active_params(self) -> int:
        return sum(self.active.values())


def _attn_params(cfg: ModelConfig) -> int:
    H, hd = cfg.hidden_size, cfg.dim_head
    return H * cfg.num_heads * hd * 2 + H * cfg.num_kv_heads * hd * 2


def embedding_params(cfg: ModelConfig) -> ParamCount:
    """Token embedding [V, H] (also the output head when tied)."""
    pc = ParamCount()
    pc.add("embeddings", (cfg.vocab_size or 0) * cfg.hidden_size)
    return pc


def layer_params(cfg: ModelConfig, i: int) -> ParamCount:
    """Block i: two RMSNorms, attention, then a dense SwiGLU or router + routed experts + shared experts."""
    H, m = cfg.hidden_size, cfg.moe
    pc = ParamCount()
    pc.add("norms", 2 * H)
    pc.add("attention", _attn_params(cfg))
    if cfg.is_moe_layer(i):
        pc.add("router", H * m.num_experts)
        pc.add("experts", m.num_experts * 3 * H * m.expert_ffn_size, m.top_k * 3 * H * m.expert_ffn_size)
        pc.add("shared_experts", 3 * H * m.expert_ffn_size * m.num_shared_experts)
    else:
        pc.add("dense_ffn", 3 * H * cfg.ffn_hidden_size)
    return pc


def head_params(cfg: ModelConfig) -> ParamCount:
    """Final RMSNorm and, when not tied to the embedding, the output head [H, V]."""
    H = cfg.hidden_size
    pc = ParamCount()
    pc.add("norms", H)
    if not cfg.tie_embeddings:
        pc.add("lm_head", (cfg.vocab_size or 0) * H)
    return pc


def mtp_params(cfg: ModelConfig) -> ParamCount:
    """Each MTP depth: two input norms, the 2H -> H projection and one dense block (its norms included)."""
    H = cfg.hidden_size
    pc = ParamCount()
    for _ in range(cfg.mtp.depth):
        pc.add("mtp", 2 * H + 2 * H * H + 2 * H + _attn_params(cfg) + 3 * H * cfg.ffn_hidden_size)
    return pc


def modality_head_params(cfg: ModelConfig) -> ParamCount:
    """Visual (NFSP bitwise) and audio (NCP) heads and the visual patch merger: none in ModelConfig yet.

    When ModelConfig grows them, count them here under their own component names; `plan_memory` places
    components it has no rule for on the last pipeline stage, split over tensor parallel.
    """
    return ParamCount()


def count_parameters(cfg: ModelConfig) -> ParamCount:
    pc = embedding_params(cfg)
    for i in range(cfg.num_layers):
        pc.merge(layer_params(cfg, i))
    pc.merge(head_params(cfg))
    pc.merge(mtp_params(cfg))
    return pc.merge(modality_head_params(cfg))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per input token."""
    pc = count_parameters(cfg)
    H, V, depth = cfg.hidden_size, cfg.vocab_size or 0, cfg.mtp.depth
    not_matmul = pc.active["embeddings"] + pc.active.get("lm_head", 0) + pc.active["norms"] + depth * 4 * H
    head = V * H * (1 + depth)  # the (tied or not) output head runs for NTP and for every MTP depth
    matmul = pc.active_params - not_matmul + head
    attention = 12 * (cfg.num_layers + depth) * seq_len * cfg.num_heads * cfg.dim_head
    return 6.0 * matmul + attention


def tokens_per_day(flops_token: float, devices: int, mfu: float = DEFAULT_MFU,
                   device_tflops: float = DEFAULT_DEVICE_TFLOPS) -> float:
    """Training tokens per day on `devices` accelerators that sustain `mfu` of `device_tflops` peak."""
    return devices * device_tflops * 1e12 * mfu * 86400.0 / flops_token


@dataclass
class PlanOptions:
    """What the config does not say: storage dtypes, the throughput assumptions and the device budget."""

    param_dtype: str = "bf16"  # weights (and activations) on the device; the router stays fp32
    grad_dtype: str = "fp32"  # fp32 main grads accumulate over micro-batches (Paddle amp_master_grad)
    devices: int | None = None  # None: the layout's world size
    mfu: float = DEFAULT_MFU
    device_tflops: float = DEFAULT_DEVICE_TFLOPS
    device_memory_gb: float = DEFAULT_DEVICE_MEMORY_GB


def plan_report(run_cfg, opts: PlanOptions | None = None) -> dict[str, Any]:
    """Everything `ernie5 plan` prints, as one JSON-able dict (`run_cfg` is a RunConfig)."""
    from ernie5.errors import UserError
    from ernie5.plan_memory import check_layout, memory_plan, resolve_data

    opts = opts or PlanOptions()
    cfg = run_cfg.model
    if cfg.vocab_size is None:
        raise UserError("model.vocab_size", "must be set for `plan` (it is otherwise read from the data)")
    run_cfg, note = resolve_data(run_cfg, opts.devices)
    check_layout(run_cfg)
    pc = count_parameters(cfg)
    fpt = flops_per_token(cfg, run_cfg.data.seq_len)
    mem = memory_plan(run_cfg, opts.param_dtype, opts.grad_dtype)
    mem["note"] = note
    devices = opts.devices or run_cfg.parallel.world_size
    no_mtp_total = pc.total_params - pc.total.get("mtp", 0)
    no_mtp_active = pc.active_params - pc.active.get("mtp", 0)
    return {
        "total_params": pc.total_params,
        "active_params": pc.active_params,
        "active_fraction": pc.active_params / pc.total_params,
        # the reading the published ERNIE 4.5 counts use: embeddings included, MTP weights excluded
        "total_params_no_mtp": no_mtp_total,
        "active_params_no_mtp": no_mtp_active,
        "params_by_component": pc.total,
        "active_by_component": pc.active,
        "flops_per_token": fpt,
        "seq_len": run_cfg.data.seq_len,
        "memory_per_device_bytes": mem["memory_per_device_bytes"],
        "memory": mem,
        "fits_device_memory": mem["memory_per_device_bytes"] <= opts.device_memory_gb * 1e9,
        "device_memory_bytes": opts.device_memory_gb * 1e9,
        "throughput": {
            "devices": devices, "mfu": opts.mfu, "device_tflops": opts.device_tflops,
            "tokens_per_day": tokens_per_day(fpt, devices, opts.mfu, opts.device_tflops),
            "assumed": "MFU and peak TFLOP/s are assumptions, not measurements (defaults 0.4 and 989 = H100/H800 "
                       "dense bf16; MFU is quoted against the bf16 peak even with FP8 GEMMs)",
        },
    }


def _b(n: float) -> str:
    return f"{n / 1e12:.4g}T" if n >= 1e12 else f"{n / 1e9:.4g}B"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def format_plan(rep: dict[str, Any]) -> str:
    """The human-readable `ernie5 plan` output."""
    lines = [f"{'component':<16}{'total':>20}{'active':>20}"]
    for k, v in rep["params_by_component"].items():
        lines.append(f"{k:<16}{v:>20,}{rep['active_by_component'][k]:>20,}")
    lines.append(f"{'all':<16}{rep['total_params']:>20,}{rep['active_params']:>20,}")
    lines.append(f"parameters: {_b(rep['total_params'])} total, {_b(rep['active_params'])} active "
                 f"({100 * rep['active_fraction']:.2f}%); without MTP (the published reading): "
                 f"{_b(rep['total_params_no_mtp'])} / {_b(rep['active_params_no_mtp'])}")
    lines.append(f"training FLOPs per token at seq_len {rep['seq_len']}: {rep['flops_per_token']:.4g}")
    m = rep["memory"]
    lay = m["layout"]
    lines.append(f"layout: data {lay['data']} x tensor {lay['tensor']} x pipeline {lay['pipeline']} "
                 f"(virtual {lay['virtual_pipeline']}) = {lay['world_size']} devices; expert {lay['expert']}, "
                 f"{'ZeRO-1' if lay['sharding_stage'] else 'no ZeRO'}; micro-batch {lay['micro_batch_size']} "
                 f"x seq {rep['seq_len']}, {lay['micro_batches']} micro-batches per step")
    lines.append(f"dtypes: params {m['param_dtype']}, grads {m['grad_dtype']}, Adam fp32 (master + 2 moments); "
                 f"recompute {m['recompute']}; fp8 {m['fp8']}")
    if m["note"]:
        lines.append(m["note"])
    w = m["worst_stage"]
    lines.append(f"memory per device (worst pipeline stage {w['stage']}, layers {w['layers']}):")
    for key in ("params", "grads", "optimizer", "activations"):
        lines.append(f"  {key:<12}{_gb(w[key + '_bytes']):>12}")
    lines.append(f"  {'total':<12}{_gb(w['total_bytes']):>12}   (activations: {w['in_flight']:.3g} micro-batch(es) "
                 f"in flight; no allowance for buffers/fragmentation)")
    fits = "fits" if rep["fits_device_memory"] else "does NOT fit"
    lines.append(f"  {fits} a {_gb(rep['device_memory_bytes'])} device")
    t = rep["throughput"]
    lines.append(f"throughput: {t['tokens_per_day'] / 1e9:.2f}B tokens/day on {t['devices']} devices "
                 f"(assumed {t['mfu']:.2f} MFU of {t['device_tflops']:g} TFLOP/s per device)")
    return "\n".join(lines)
