"""Hugging Face ERNIE 4.5 interop: `export_hf` writes an `Ernie4_5_MoeForCausalLM` directory, `import_hf` turns
one into an ernie5 checkpoint, `load_pretrained_state` reads either kind as a state dict for a model config.

The exported directory holds config.json, generation_config.json, model.safetensors (or shards + index),
tokenizer.model, tokenizer.json and tokenizer_config.json (see hf_tokenizer for why tokenizer.json).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from ernie5.errors import ConfigError, UserError
import ernie5.export.hf_layout as hf_layout
import ernie5.export.hf_tokenizer as hf_tokenizer
from ernie5.export.files import (DEFAULT_MAX_SHARD_BYTES, EXPORT_DTYPES, bf16_names, check_free, read_checkpoint,
                                 read_safetensors_dir, staging_dir, write_safetensors)
from ernie5.model.config import ModelConfig

TOKENIZER_FILE = "tokenizer.model"


def export_hf(ckpt_path: str, out_dir: str, tokenizer_model: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: str = "fp32") -> Path:
    """Export a text checkpoint as an HF `Ernie4_5_MoeForCausalLM` dir (`Ernie4_5ForCausalLM` if it has no MoE).

    `tokenizer_model` defaults to the checkpoint's `tokenizer.model_path`; weights over `max_shard_bytes`
    are split into shards with an index. `dtype` "bf16" stores the weights as BF16 (rounded to nearest even)
    except the router's gate and statistics, which stay fp32 as transformers keeps them
    (`_keep_in_fp32_modules_strict`); config.json then says bfloat16.
    """
    check_free(Path(out_dir))  # before the (possibly long) read and conversion
    ckpt, cfg, state = read_checkpoint(ckpt_path)
    mcfg = cfg.model
    hf_layout.check_exportable(mcfg, str(ckpt))
    tensors = hf_layout.to_hf_tensors(state, mcfg, str(ckpt))
    bf16 = bf16_names(tensors, dtype, lambda k: k.endswith(".mlp.gate.weight") or ".mlp.moe_statics." in k)
    moe_mtp = [k for k in range(mcfg.mtp.depth) if mcfg.is_moe_layer(k)]
    if moe_mtp:  # PaddleFormers picks dense or MoE for MTP block k by the rule for decoder layer k
        print(f"warning: {ckpt}: PaddleFormers builds MTP block(s) {moe_mtp} as MoE layers (the MoE-layer rule for "
              "those layer indices) while ours are dense, so this export will not load there (transformers and "
              "ernie5 import are fine)", file=sys.stderr)
    tok = Path(tokenizer_model or cfg.tokenizer.model_path)
    if not tok.is_file():
        raise UserError(str(tok), "tokenizer model not found (pass --tokenizer PATH)")
    ids, tokens, tok_vocab = hf_tokenizer.special_tokens(tok)
    if tok_vocab > mcfg.vocab_size:
        raise UserError(str(tok), f"tokenizer has {tok_vocab} pieces, more than model.vocab_size {mcfg.vocab_size}")
    tok_json = hf_tokenizer.tokenizer_json(tok)
    out = Path(out_dir)
    with staging_dir(out) as tmp:
        _write_json(tmp / "config.json", hf_layout.hf_config(mcfg, ids, EXPORT_DTYPES[dtype]))
        _write_json(tmp / "generation_config.json", ids)
        write_safetensors(tensors, tmp, max_shard_bytes, metadata={"source": "ernie5"}, bf16=bf16)
        shutil.copyfile(tok, tmp / TOKENIZER_FILE)
        _write_json(tmp / "tokenizer.json", tok_json)
        _write_json(tmp / "tokenizer_config.json", hf_tokenizer.tokenizer_config(tokens, mcfg.max_seq_len))
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def _read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise UserError(str(hf_dir), "no such directory")
    if not path.is_file():
        raise UserError(str(hf_dir), "no config.json (not a Hugging Face model directory)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(str(path), f"unreadable ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(str(path), "top level must be a JSON object")
    return raw


def _drop_unusable_mtp(tensors: dict[str, np.ndarray], where: str) -> bool:
    """ernie5's MTP block is dense; an MTP stored as a MoE block is left out, with a warning. True if dropped."""
    depth = hf_layout.mtp_depth_of(tensors)
    if depth and "model.mtp_block.0.mlp.gate_proj.weight" not in tensors:
        for name in [n for n in tensors if n.startswith("model.mtp_")]:
            del tensors[name]
        print(f"warning: {where}: its MTP block is not a dense SwiGLU block; imported without MTP (mtp.depth=0)",
              file=sys.stderr)
        return True
    return False


def _mtp_depth(hf: dict, tensors: dict[str, np.ndarray], where: str) -> int:
    """MTP depth to import: the stored MTP weights, checked against the depth config.json states (under
    num_nextn_predict_layers or multi_token_pred_depth, either accepted). A config stating MTP layers whose
    weights are absent (an inference-only copy) imports without MTP, with a warning."""
    config_path = str(Path(where) / "config.json")
    dropped = _drop_unusable_mtp(tensors, where)
    stored = hf_layout.mtp_depth_of(tensors)
    declared = hf_layout.declared_mtp_depth(hf, config_path)
    if declared is not None and stored and declared != stored:
        raise UserError(config_path, f"states {declared} MTP layers, the weights hold {stored}")
    if declared and not stored and not dropped:
        print(f"warning: {config_path} states {declared} MTP layers but {where} has no MTP weights; imported "
              "without MTP (mtp.depth=0)", file=sys.stderr)
    return stored


def read_hf(hf_dir: str):
    """(config.json, an ernie5 RunConfig with the matching model, ernie5 state as numpy) of an HF ERNIE 4.5 dir.

    The rest of the RunConfig is ernie5's defaults, with data.seq_len capped at the model's max_seq_len.
    """
    from ernie5.runconfig import config_from_dict
    from ernie5.data.config import DataConfig

    src = Path(hf_dir)
    hf = _read_hf_config(src)
    tensors = read_safetensors_dir(src)
    section = hf_layout.model_section_from_hf(hf, _mtp_depth(hf, tensors, str(src)), str(src / "config.json"))
    seq_len = min(DataConfig().seq_len, section["max_seq_len"])
    try:
        cfg = config_from_dict({"model": section, "data": {"seq_len": seq_len}})
    except ConfigError as e:
        raise UserError(str(src / "config.json"), f"does not map to a valid ernie5 model ({e})") from None
    return hf, cfg, hf_layout.from_hf_tensors(tensors, cfg.model, str(src))


def import_hf(hf_dir: str, out_ckpt_dir: str) -> Path:
    """Write an ernie5 checkpoint dir (model.safetensors, config.yaml, manifest.json, tokenizer.model if the HF
    dir has one) that `ernie5.load_model` and `load_pretrained_state` accept."""
    from ernie5.tensor_io import save_tensors
    from ernie5.train.checkpoint import save_text, write_checkpoint_dir

    src, out = Path(hf_dir), Path(out_ckpt_dir).resolve()
    check_free(out)  # before the (possibly long) read
    _, cfg, state = read_hf(hf_dir)
    writers = {}
    if (src / TOKENIZER_FILE).is_file():
        writers[TOKENIZER_FILE] = lambda p: shutil.copyfile(src / TOKENIZER_FILE, p)
        cfg.tokenizer.model_path = str(out / TOKENIZER_FILE)
    else:
        print(f"warning: {src} has no {TOKENIZER_FILE}; set tokenizer.model_path before training", file=sys.stderr)
    writers["model.safetensors"] = save_tensors(state)
    writers["config.yaml"] = save_text(cfg.to_yaml())
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_checkpoint_dir(out, 0, writers)


def _architecture(cfg: ModelConfig) -> dict:
    """What must agree for a state dict to fit a model (top_k, rope theta, eps, max_seq_len may differ)."""
    arch = {name: getattr(cfg, name) for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                                  "ffn_hidden_size", "tie_embeddings")}
    arch.update({"vocab_size": cfg.vocab_size, "head_dim": cfg.dim_head, "moe.num_experts": cfg.moe.num_experts,
                 "mtp.depth": cfg.mtp.depth})
    if cfg.moe.num_experts:
        arch.update({"moe.num_shared_experts": cfg.moe.num_shared_experts,
                     "moe.expert_ffn_size": cfg.moe.expert_ffn_size,
                     "moe.layer_start/layer_end/layer_interval (MoE layers)":
                         [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]})
    return arch


def load_pretrained_state(path: str, model_cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Weights for a model built from `model_cfg`, from an HF ERNIE 4.5 dir or an ernie5 checkpoint / run dir /
    native export: {state-dict name: numpy array}. A source whose architecture differs is a UserError naming
    the first differing field."""
    if (Path(path) / "config.json").is_file():
        _, cfg, state = read_hf(path)
    else:
        _, cfg, state = read_checkpoint(path)
    want, have = _architecture(model_cfg), _architecture(cfg.model)
    for key, value in want.items():
        if value is not None and have.get(key) != value:
            raise UserError(f"model.{key}", f"run config has {value}, pretrained weights in {path} have "
                                            f"{have.get(key)}")
    return state
