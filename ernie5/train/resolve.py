"""The run config a trainer actually uses: sizes the prepared data decides, filled in on a copy.

The caller's config is never changed; the trainer builds from, and saves, the resolved copy.
"""

from __future__ import annotations

import copy
import os

from ernie5.data.shards import read_meta
from ernie5.errors import UserError
from ernie5.runconfig import RunConfig
from ernie5.train.unified_data import multimodal_meta, resolve_multimodal

_DETERMINISM_FLAGS = ("FLAGS_cudnn_deterministic", "FLAGS_embedding_deterministic")


def check_determinism(cfg: RunConfig) -> None:
    """`run.deterministic` on a CUDA build needs paddle's determinism flags, which paddle reads at import.

    CPU kernels here are deterministic already (same config + seed -> bit-identical losses, tested).
    """
    import paddle

    if cfg.run.deterministic and paddle.is_compiled_with_cuda():
        for flag in _DETERMINISM_FLAGS:
            if os.environ.get(flag, "").lower() not in ("1", "true"):
                raise UserError("run.deterministic", f"export {flag}=1 before launching (paddle reads it at import)")


def resolve_run_config(cfg: RunConfig) -> RunConfig:
    """A copy of `cfg` with model.vocab_size (and, for multimodal shards, model.multimodal) taken from the
    prepared shards' meta.json, after checking that what the config already says covers them. Under tensor
    parallelism the vocabulary must split evenly (set model.vocab_size to a multiple of parallel.tensor: the
    extra rows are never a target)."""
    cfg = _resolved(cfg)
    P, V = cfg.parallel.tensor, cfg.model.vocab_size
    if P > 1 and V % P:
        raise UserError("model.vocab_size", f"{V} is not divisible by parallel.tensor {P} (set model.vocab_size "
                                            f"to a multiple of {P}, e.g. {-(-V // P) * P})")
    return cfg


def _resolved(cfg: RunConfig) -> RunConfig:
    cfg = copy.deepcopy(cfg)
    if cfg.data.synthetic:
        if cfg.model.vocab_size is None:
            raise UserError("model.vocab_size", "must be set when data.synthetic is true")
        return cfg
    sources = cfg.data.resolved_sources(cfg.tokenizer.corpus)
    if any(s.config.is_multimodal for s in sources):
        resolve_multimodal(cfg, multimodal_meta(cfg))  # fills the copy
        return cfg
    metas = {s.name: read_meta(s.dir) for s in sources}
    vocab = max(int(m["vocab_size"]) for m in metas.values())
    tokenizers = {name: m.get("tokenizer_sha256") for name, m in metas.items()}
    if len(set(tokenizers.values())) > 1:
        raise UserError("data.sources", "the sources were tokenised with different tokenizers (sha256 "
                                        + ", ".join(f"{n} {str(t)[:12]}" for n, t in tokenizers.items())
                                        + "): prepare them all with tokenizer.model_path")
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size < vocab:
        raise UserError("model.vocab_size", f"{cfg.model.vocab_size} < tokenizer vocabulary {vocab}")
    return cfg
