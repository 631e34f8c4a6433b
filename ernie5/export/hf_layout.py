"""Name, shape and config mapping between ernie5 and Hugging Face ERNIE 4.5. Numpy only, no files.

HF Linear weights are [out, in] and ours (Paddle) are [in, out]. Our SwiGLU keeps gate and up in one [H, 2F]
GEMM (columns :F gate, F: up); HF stores `gate_proj` and `up_proj` separately. The router weight is [E, H] and
the correction bias [1, E] in HF. MTP weights use the names of the original ERNIE 4.5 checkpoints
(`model.mtp_block.k`, `model.mtp_emb_norm.k`, `model.mtp_hidden_norm.k`, `model.mtp_linear_proj.k`), which
transformers skips on load and ERNIE-aware servers read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ernie5.errors import UserError
from ernie5.model.config import ModelConfig

MOE_ARCH, MOE_TYPE = "Ernie4_5_MoeForCausalLM", "ernie4_5_moe"
DENSE_ARCH, DENSE_TYPE = "Ernie4_5ForCausalLM", "ernie4_5"
MTP_DEPTH_KEYS = ("num_nextn_predict_layers", "multi_token_pred_depth")


@dataclass(frozen=True)
class Rule:
    """One ernie5 tensor (its shape in our layout) and the HF tensor(s) holding it.

    kind: same | transpose | gate_up (our [H, 2F] = HF gate [F, H] and up [F, H]) | bias_row ([E] = HF [1, E]).
    """

    ours: str
    hf: tuple[str, ...]
    kind: str
    shape: tuple[int, ...]


def _linear(ours: str, hf: str, n_in: int, n_out: int) -> Rule:
    return Rule(f"{ours}.weight", (f"{hf}.weight",), "transpose", (n_in, n_out))


def _norm(ours: str, hf: str, size: int) -> Rule:
    return Rule(f"{ours}.weight", (f"{hf}.weight",), "same", (size,))


def _swiglu(ours: str, hf: str, hidden: int, ffn: int) -> list[Rule]:
    return [Rule(f"{ours}.gate_up.weight", (f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"), "gate_up",
                 (hidden, 2 * ffn)),
            _linear(f"{ours}.down", f"{hf}.down_proj", ffn, hidden)]


def _block_rules(cfg: ModelConfig, ours: str, hf: str, moe: bool) -> list[Rule]:
    H, D, E = cfg.hidden_size, cfg.dim_head, cfg.moe.num_experts
    rules = [_norm(f"{ours}.input_norm", f"{hf}.input_layernorm", H),
             _norm(f"{ours}.post_attn_norm", f"{hf}.post_attention_layernorm", H),
             _linear(f"{ours}.attn.q_proj", f"{hf}.self_attn.q_proj", H, cfg.num_heads * D),
             _linear(f"{ours}.attn.k_proj", f"{hf}.self_attn.k_proj", H, cfg.num_kv_heads * D),
             _linear(f"{ours}.attn.v_proj", f"{hf}.self_attn.v_proj", H, cfg.num_kv_heads * D),
             _linear(f"{ours}.attn.o_proj", f"{hf}.self_attn.o_proj", cfg.num_heads * D, H)]
    if not moe:
        return rules + _swiglu(f"{ours}.mlp", f"{hf}.mlp", H, cfg.ffn_hidden_size)
    rules += [_linear(f"{ours}.mlp.router", f"{hf}.mlp.gate", H, E),
              Rule(f"{ours}.mlp.router.e_score_correction_bias",
                   (f"{hf}.mlp.moe_statics.e_score_correction_bias",), "bias_row", (E,))]
    for j in range(E):
        rules += _swiglu(f"{ours}.mlp.experts.{j}", f"{hf}.mlp.experts.{j}", H, cfg.moe.expert_ffn_size)
    if cfg.moe.num_shared_experts:
        rules += _swiglu(f"{ours}.mlp.shared", f"{hf}.mlp.shared_experts", H,
                         cfg.moe.expert_ffn_size * cfg.moe.num_shared_experts)
    return rules


def layout_rules(cfg: ModelConfig) -> list[Rule]:
    """Every tensor of a text model built from `cfg`, with its HF name(s)."""
    H, V = cfg.hidden_size, cfg.vocab_size
    rules = [Rule("embed.weight", ("model.embed_tokens.weight",), "same", (V, H))]
    for i in range(cfg.num_layers):
        rules += _block_rules(cfg, f"layers.{i}", f"model.layers.{i}", cfg.is_moe_layer(i))
    rules.append(_norm("norm", "model.norm", H))
    if not cfg.tie_embeddings:
        rules.append(_linear("lm_head", "lm_head", H, V))
    for k in range(cfg.mtp.depth):
        rules += [_norm(f"mtp.{k}.emb_norm", f"model.mtp_emb_norm.{k}", H),
                  _norm(f"mtp.{k}.hidden_norm", f"model.mtp_hidden_norm.{k}", H),
                  _linear(f"mtp.{k}.proj", f"model.mtp_linear_proj.{k}", 2 * H, H)]
        rules += _block_rules(cfg, f"mtp.{k}.block", f"model.mtp_block.{k}", moe=False)
    return rules


def _hf_shapes(r: Rule) -> list[tuple[int, ...]]:
    """Shapes of the HF tensor(s) of rule `r`."""
    if r.kind == "same":
        return [r.shape]
    if r.kind == "transpose":
        return [r.shape[::-1]]
    if r.kind == "bias_row":
        return [(1, r.shape[0])]
    return [(r.shape[1] // 2, r.shape[0])] * 2


def to_hf_tensors(state: dict[str, np.ndarray], cfg: ModelConfig, where: str) -> dict[str, np.ndarray]:
    """ernie5 state (Paddle layout) -> HF tensors ([out, in]); names the format has no place for are an error."""
    rules = layout_rules(cfg)
    extra = sorted(set(state) - {r.ours for r in rules})
    if extra:
        raise UserError(where, f"the ERNIE 4.5 HF format has no place for {extra[:3]} (text-only models export)")
    out = {}
    for r in rules:
        w = state[r.ours]
        if tuple(w.shape) != r.shape:
            raise UserError(where, f"{r.ours} has shape {list(w.shape)}, its config says {list(r.shape)}")
        if r.kind == "same":
            out[r.hf[0]] = w
        elif r.kind == "transpose":
            out[r.hf[0]] = w.T
        elif r.kind == "bias_row":
            out[r.hf[0]] = w.reshape(1, -1)
        else:  # gate_up: columns [:F] feed the gate, [F:] the up projection
            f = w.shape[1] // 2
            out[r.hf[0]], out[r.hf[1]] = w[:, :f].T, w[:, f:].T
    # contiguous copies: safetensors writes raw buffers
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_hf_tensors(tensors: dict[str, np.ndarray], cfg: ModelConfig, where: str) -> dict[str, np.ndarray]:
    """HF tensors -> ernie5 state for `cfg`; missing tensors are an error, unknown ones too."""
    rules = layout_rules(cfg)
    wanted = {name for r in rules for name in r.hf}
    missing = sorted(wanted - set(tensors))
    if missing:
        raise UserError(where, f"missing tensors {missing[:3]} for the config in config.json")
    # a tied head may still be stored (transformers ignores it then, and so do we)
    unknown = sorted(k for k in set(tensors) - wanted if not (cfg.tie_embeddings and k == "lm_head.weight"))
    if unknown:
        raise UserError(where, f"tensors ernie5 cannot place: {unknown[:3]}")
    for r in rules:
        for name, want in zip(r.hf, _hf_shapes(r)):
            if tuple(tensors[name].shape) != want:
                raise UserError(where, f"{name} has shape {list(tensors[name].shape)}, config.json implies "
                                       f"{list(want)}")
    out = {}
    for r in rules:
        w = tensors[r.hf[0]]
        if r.kind == "same":
            out[r.ours] = w
        elif r.kind == "transpose":
            out[r.ours] = w.T
        elif r.kind == "bias_row":
            out[r.ours] = w.reshape(-1)
        else:
            out[r.ours] = np.concatenate([w.T, tensors[r.hf[1]].T], axis=1)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def check_exportable(cfg: ModelConfig, where: str) -> None:
    """Refuse what `Ernie4_5_MoeForCausalLM` / `Ernie4_5ForCausalLM` cannot express."""
    if cfg.moe.num_experts and cfg.moe.routing != "agnostic":
        raise UserError(where, f"model.moe.routing={cfg.moe.routing!r}: the HF format has one router and one "
                               "expert pool per layer (modality-agnostic routing only)")
    if cfg.vocab_size is None:
        raise UserError(where, "model.vocab_size is not set in the checkpoint's config.yaml")
    # rope_sections need no check: text positions have t = h = w, which is plain 1-D RoPE whatever the split


def hf_config(cfg: ModelConfig, special_ids: dict[str, int], dtype: str = "float32") -> dict:
    """config.json for `cfg`: the MoE class when it has experts, the dense ERNIE 4.5 class otherwise.

    `dtype` names the stored weights' type (transformers 5 reads `dtype`; transformers 4.x and PaddleFormers
    read `torch_dtype`, so both are written).
    """
    moe = cfg.moe.num_experts > 0
    out = {
        "architectures": [MOE_ARCH if moe else DENSE_ARCH],
        "model_type": MOE_TYPE if moe else DENSE_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_head,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        # both spellings: transformers 5 reads rope_parameters, 4.x and ERNIE's own loaders read rope_theta
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_bias": False,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
        **special_ids,
    }
    if moe:
        end = cfg.num_layers - 1 if cfg.moe.layer_end is None else cfg.moe.layer_end
        out.update({
            "moe_num_experts": cfg.moe.num_experts,
            "moe_k": cfg.moe.top_k,
            "moe_intermediate_size": cfg.moe.expert_ffn_size,
            "moe_num_shared_experts": cfg.moe.num_shared_experts,
            "moe_layer_start_index": cfg.moe.layer_start,
            "moe_layer_end_index": end,
            "moe_layer_interval": cfg.moe.layer_interval,
            "moe_norm_min": cfg.moe.norm_min,
            "moe_use_aux_free": True,  # ERNIE's flag for the e_score_correction_bias (PaddleFormers reads it)
            "router_aux_loss_coef": cfg.moe.aux_loss_coef,
        })
    # MTP depth under both names ERNIE 4.5 tooling uses: PaddleFormers reads num_nextn_predict_layers (and builds
    # one MTP layer when it is absent, hence also written when 0), the original ERNIE 4.5 configs carry
    # multi_token_pred_depth; transformers ignores both and skips the MTP weights
    out.update({key: cfg.mtp.depth for key in MTP_DEPTH_KEYS})
    return out


def declared_mtp_depth(hf: dict, where: str) -> int | None:
    """The MTP depth a config.json states under either key (None if under neither); both keys must agree."""
    stated = {key: hf[key] for key in MTP_DEPTH_KEYS if hf.get(key) is not None}
    for key, value in stated.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(where, f"{key}={value!r} is not a number of MTP layers")
    if len(set(stated.values())) > 1:
        raise UserError(where, " and ".join(f"{k}={v}" for k, v in stated.items()) + " disagree")
    return next(iter(stated.values()), None)


def _get(hf: dict, key: str, where: str, default=None, required: bool = True):
    if key in hf and hf[key] is not None:
        return hf[key]
    if required and default is None:
        raise UserError(where, f"missing field {key!r}")
    return default


def model_section_from_hf(hf: dict, mtp_depth: int, where: str) -> dict:
    """The `model:` section of an ernie5 config for an HF ERNIE 4.5 config.json (raises on what we can't run)."""
    mtype = hf.get("model_type")
    if mtype not in (MOE_TYPE, DENSE_TYPE):
        raise UserError(where, f"model_type {mtype!r} is not {MOE_TYPE!r} or {DENSE_TYPE!r}")
    if hf.get("use_bias"):
        raise UserError(where, "use_bias=true: ernie5 projections have no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(where, f"hidden_act {hf['hidden_act']!r}: ernie5 experts are SwiGLU (silu)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if rope.get("rope_type", "default") != "default" or (scaling and scaling.get("rope_type", scaling.get("type"))
                                                         not in (None, "default")):
        raise UserError(where, "RoPE scaling is not supported (ernie5 uses plain RoPE)")
    heads = _get(hf, "num_attention_heads", where)
    hidden = _get(hf, "hidden_size", where)
    model = {
        "vocab_size": _get(hf, "vocab_size", where),
        "hidden_size": hidden,
        "num_layers": _get(hf, "num_hidden_layers", where),
        "num_heads": heads,
        "num_kv_heads": _get(hf, "num_key_value_heads", where, heads, required=False),
        # transformers' own defaults when the field is absent: 128 for the dense class, H / heads for MoE
        "head_dim": _get(hf, "head_dim", where, 128 if mtype == DENSE_TYPE else hidden // heads, required=False),
        "ffn_hidden_size": _get(hf, "intermediate_size", where),
        "max_seq_len": _get(hf, "max_position_embeddings", where),
        "rms_norm_eps": float(_get(hf, "rms_norm_eps", where)),
        "rope_theta": float(rope.get("rope_theta") or _get(hf, "rope_theta", where, 500000.0, required=False)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "mtp": {"depth": mtp_depth},
    }
    experts = (hf.get("moe_num_experts") or 0) if mtype == MOE_TYPE else 0
    if isinstance(experts, list):
        raise UserError(where, f"moe_num_experts={experts}: modality-isolated expert groups (ERNIE 4.5 VL) "
                               "are not a text MoE ernie5 can import")
    if experts:
        end = hf.get("moe_layer_end_index", -1)
        model["moe"] = {
            "num_experts": experts,
            "top_k": _get(hf, "moe_k", where),
            "num_shared_experts": hf.get("moe_num_shared_experts") or 0,
            "expert_ffn_size": _get(hf, "moe_intermediate_size", where),
            "layer_start": hf.get("moe_layer_start_index", 1),  # transformers' default
            "layer_end": None if end in (-1, None) else end,
            "layer_interval": hf.get("moe_layer_interval", 1),
            "norm_min": float(hf.get("moe_norm_min", 1e-12)),
        }
    return model


def mtp_depth_of(names) -> int:
    """Number of MTP depths stored in an HF checkpoint (0 when it has none)."""
    prefix = "model.mtp_linear_proj."
    return len({n[len(prefix):].split(".")[0] for n in names if n.startswith(prefix)})
