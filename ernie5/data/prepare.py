"""`ernie5 data prepare`: tokenise the configured text corpus once into train / val shards."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from ernie5.data.shards import sha256_file, write_shards
from ernie5.errors import UserError
from ernie5.modality.text_tokenizer import TextTokenizer

if TYPE_CHECKING:  # the run config sits above data (it assembles every component's config)
    from ernie5.runconfig import RunConfig


def read_documents(files: list[str]) -> list[str]:
    docs = []
    for f in files:
        if not os.path.isfile(f):
            raise UserError(f, "corpus file not found (run `ernie5 data fetch` first?)")
        try:
            docs.extend(line for line in Path(f).read_text(encoding="utf-8").splitlines() if line.strip())
        except UnicodeDecodeError as e:
            raise UserError(f, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not docs:
        raise UserError("tokenizer.corpus", "the corpus files hold no documents")
    return docs


def prepare_text(cfg: RunConfig, progress: bool = True) -> dict:
    """Tokenise `cfg.tokenizer.corpus` into `cfg.data.dir`. Returns the split sizes."""
    tok = TextTokenizer(cfg.tokenizer.model_path)
    docs = read_documents(cfg.tokenizer.corpus)
    rng = np.random.default_rng(cfg.run.seed)
    is_val = rng.random(len(docs)) < cfg.data.val_fraction
    if cfg.data.val_fraction > 0 and not is_val.any():
        is_val[rng.integers(len(docs))] = True
    d = cfg.data
    train, val = [], []
    copies = d.bpe_dropout_copies if d.bpe_dropout > 0 else 1
    bar = tqdm(total=len(docs) * copies, desc="tokenising", unit="doc", disable=not progress)
    for copy in range(copies):
        if d.bpe_dropout > 0:
            import sentencepiece as spm

            spm.set_random_generator_seed(cfg.run.seed * 1000 + copy)
        for text, v in zip(docs, is_val):
            if v:
                if copy == 0:
                    val.append(tok.encode(text))
            else:
                train.append(tok.encode(text, dropout=d.bpe_dropout))
            bar.update(1)
    bar.close()
    write_shards(d.dir, {"train": train, "val": val}, tok.eos_id, tok.vocab_size,
                 {"tokenizer": tok.path, "tokenizer_sha256": sha256_file(Path(tok.path)),
                  "bpe_dropout": d.bpe_dropout, "bpe_dropout_copies": copies})
    return {"train_tokens": sum(len(x) + 1 for x in train), "val_tokens": sum(len(x) + 1 for x in val),
            "train_docs": len(train), "val_docs": len(val)}
