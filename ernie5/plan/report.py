"""`ernie5 plan`: model size, FLOPs per token, per-device memory and throughput on paper (no tensors are built).

The counting (parameters by component, active parameters and training FLOPs of one token of each modality) is in
`ernie5.plan.params`; its docstring states the conventions. In short: FLOPs per token follow
the PaLM accounting, and the per-token figure of a multimodal model is that of a text token, which is what the
trainer's `mfu` metric and `ernie5 bench` use; the report lists every modality's figure beside it. Memory lives
in `ernie5.plan.memory`, the allocation-free build check in `ernie5.plan.lazy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ernie5.errors import UserError
from ernie5.plan.memory import check_layout, memory_plan, resolve_data
from ernie5.plan.params import count_parameters, flops_per_token, modalities

# Defaults for tokens/day: H100 / H800 SXM dense bf16 peak and an MFU typical of large MoE runs
# (ERNIE 4.5 reports 47% on H800 for 300B-A47B; 40% leaves room for a less tuned stack).
DEFAULT_DEVICE_TFLOPS = 989.0
DEFAULT_MFU = 0.4
DEFAULT_DEVICE_MEMORY_GB = 80.0


def tokens_per_day(flops_token: float, devices: int, mfu: float = DEFAULT_MFU,
                   device_tflops: float = DEFAULT_DEVICE_TFLOPS) -> float:
    """Training tokens per day on `devices` accelerators that sustain `mfu` of `device_tflops` peak."""
    return devices * device_tflops * 1e12 * mfu * 86400.0 / flops_token


@dataclass
class PlanOptions:
    """What the config does not say: storage dtypes, the throughput assumptions and the device budget."""

    param_dtype: str = "bf16"  # weights (and activations) on the device; routers and norms stay fp32
    grad_dtype: str = "fp32"  # fp32 main grads accumulate over micro-batches (Paddle amp_master_grad)
    devices: int | None = None  # None: the layout's world size
    mfu: float = DEFAULT_MFU
    device_tflops: float = DEFAULT_DEVICE_TFLOPS
    device_memory_gb: float = DEFAULT_DEVICE_MEMORY_GB


def plan_report(run_cfg, opts: PlanOptions | None = None) -> dict[str, Any]:
    """Everything `ernie5 plan` prints, as one JSON-able dict (`run_cfg` is a RunConfig)."""
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
    kinds = modalities(cfg)
    return {
        "total_params": pc.total_params,
        "active_params": pc.active_params,
        "active_fraction": pc.active_params / pc.total_params,
        # the reading the published ERNIE 4.5 counts use: embeddings included, MTP weights excluded
        "total_params_no_mtp": no_mtp_total,
        "active_params_no_mtp": no_mtp_active,
        "params_by_component": pc.total,
        "active_by_component": pc.active,  # active figures are one text token's
        "flops_per_token": fpt,  # a text token's (see ernie5.plan.params)
        # one token of each modality (only "text" for a text model)
        "active_params_by_modality": {k: count_parameters(cfg, k).active_params for k in kinds},
        "flops_per_token_by_modality": {k: flops_per_token(cfg, run_cfg.data.seq_len, k) for k in kinds},
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
    if n >= 1e12:
        return f"{n / 1e12:.4g}T"
    return f"{n / 1e9:.4g}B" if n >= 1e9 else f"{n / 1e6:.4g}M"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def format_plan(rep: dict[str, Any]) -> str:
    """The human-readable `ernie5 plan` output."""
    active = "active" if len(rep["flops_per_token_by_modality"]) == 1 else "active (text)"
    lines = [f"{'component':<20}{'total':>20}{active:>20}"]
    for k, v in rep["params_by_component"].items():
        lines.append(f"{k:<20}{v:>20,}{rep['active_by_component'][k]:>20,}")
    lines.append(f"{'all':<20}{rep['total_params']:>20,}{rep['active_params']:>20,}")
    lines.append(f"parameters: {_b(rep['total_params'])} total, {_b(rep['active_params'])} active "
                 f"({100 * rep['active_fraction']:.2f}%); without MTP (the published reading): "
                 f"{_b(rep['total_params_no_mtp'])} / {_b(rep['active_params_no_mtp'])}")
    lines.append(f"training FLOPs per token at seq_len {rep['seq_len']}: {rep['flops_per_token']:.4g}")
    if len(rep["flops_per_token_by_modality"]) > 1:
        lines.append("per token of each modality (active parameters, training FLOPs; the figure above and MFU "
                     "are a text token's):")
        for k, f in rep["flops_per_token_by_modality"].items():
            lines.append(f"  {k:<22}{_b(rep['active_params_by_modality'][k]):>10}{f:>12.4g}")
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
