"""Native export: the whole ernie5 model as safetensors (our names, Paddle layout) + its config.yaml.

The directory carries the same `manifest.json` and `model.safetensors` as a training checkpoint (without the
optimizer, RNG and trainer state), so `ernie5.load_model(dir)` and `resolve_checkpoint` take it as they are. The
tokenizer is copied in and config.yaml points at the copy.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from ernie5.errors import UserError
from ernie5.export.files import SINGLE_FILE, bf16_names, check_free, read_checkpoint
from ernie5.tensor_io import load_tensors, write_safetensors_file
from ernie5.train.checkpoint import save_text, write_checkpoint_dir

TOKENIZER_FILE = "tokenizer.model"


def export_native(ckpt_path: str, out_dir: str, tokenizer_model: str | None = None, transform=None,
                  dtype: str = "fp32") -> Path:
    """Write `out_dir` with model.safetensors, config.yaml, tokenizer.model and manifest.json; returns it.

    `transform(cfg, state) -> (cfg, state)` rewrites the model first (the elastic sub-model export uses it).
    `dtype` "bf16" stores the weights as BF16 (rounded to nearest even) except the routers' gate weights and
    aux-free biases (fp32, as in training); loading reads them back as fp32 holding the bf16 values."""
    out = Path(out_dir).resolve()
    check_free(out)
    ckpt, cfg, state = read_checkpoint(ckpt_path)
    if transform is not None:
        cfg, state = transform(cfg, state)
    bf16 = bf16_names(state, dtype, lambda k: "router." in k)
    tok = Path(tokenizer_model or cfg.tokenizer.model_path)
    meta = {"format": "ernie5-native", "source": str(ckpt)}
    writers = {SINGLE_FILE: lambda p: write_safetensors_file(state, p, meta, bf16)}
    if tok.is_file():
        writers[TOKENIZER_FILE] = lambda p: shutil.copyfile(tok, p)
        cfg.tokenizer.model_path = str(out / TOKENIZER_FILE)
    elif tokenizer_model is not None:
        raise UserError(str(tok), "tokenizer model not found")
    else:  # the model is still usable without it; say so instead of failing or skipping silently
        print(f"warning: tokenizer {tok} not found; exported without it", file=sys.stderr)
    writers["config.yaml"] = save_text(cfg.to_yaml())
    # written like a checkpoint (temp dir, manifest, rename), so it loads through the checkpoint code path
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_checkpoint_dir(out, 0, writers)


def load_native_weights(export_dir: Path) -> dict[str, np.ndarray]:
    """State dict of a native export (numpy arrays, our names and layout). Only the safetensors file is read,
    whatever else the directory holds."""
    return load_tensors(Path(export_dir) / SINGLE_FILE)
