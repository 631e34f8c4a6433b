"""Tiny checkpoints with non-trivial weights, and logits from ernie5 and from transformers."""

from pathlib import Path

import numpy as np
import paddle

from ernie5.env import setup

setup()  # thread settings before paddle loads

from ernie5.runconfig import load_config
from ernie5.model.transformer import build_model
from ernie5.tensor_io import save_tensors
from ernie5.train.checkpoint import save_text, write_checkpoint

VOCAB = 416  # > the 400 pieces of the test tokenizer, so the model vocab is padded as in real runs


def tiny_overrides(tok: Path) -> list[str]:
    return [f"tokenizer.model_path={tok}", f"model.vocab_size={VOCAB}", "model.hidden_size=32", "model.num_layers=3",
            "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=48", "model.moe.num_experts=4",
            "model.moe.top_k=2", "model.moe.expert_ffn_size=16", "model.moe.num_shared_experts=1",
            "model.moe.layer_start=1", "model.max_seq_len=64", "data.seq_len=32"]


def randomize(model, seed: int) -> None:
    """Non-trivial norms and correction biases (both start as constants, which would hide mapping mistakes).

    The bias is large next to the router probabilities (~1/E) so it really changes which experts are chosen.
    """
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.set_value(paddle.to_tensor(rng.uniform(0.5, 1.5, p.shape).astype("float32")))
    for moe in model.moe_layers():
        bias = moe.router.e_score_correction_bias
        bias.set_value(paddle.to_tensor(rng.uniform(-0.3, 0.3, bias.shape).astype("float32")))


def make_checkpoint(root: Path, tok: Path, *extra: str, seed: int = 0):
    """(checkpoint dir, eval-mode model, RunConfig) for the tiny config plus `extra` overrides."""
    cfg = load_config(None, tiny_overrides(tok) + list(extra))
    model = build_model(cfg.model, seed=seed)
    randomize(model, seed)
    model.eval()
    ckpt = write_checkpoint(root / "checkpoints", 5, {"model.safetensors": save_tensors(model.state_dict()),
                                                      "config.yaml": save_text(cfg.to_yaml())}, keep_last=1)
    return ckpt, model, cfg


def token_ids(batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq)).astype(np.int64)


def ernie_logits(model, ids: np.ndarray) -> np.ndarray:
    with paddle.no_grad():
        return model(paddle.to_tensor(ids)).numpy()


def hf_logits(hf_dir: Path, ids: np.ndarray, cls_name: str = "Ernie4_5_MoeForCausalLM") -> np.ndarray:
    """Logits of the directory loaded with transformers' own class (fp32, eval)."""
    import torch
    import transformers

    model = getattr(transformers, cls_name).from_pretrained(str(hf_dir))
    model.eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()
