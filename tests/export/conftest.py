"""Export tests share one tiny tokenizer."""

from pathlib import Path

import pytest

from ernie5.env import setup

setup()  # thread settings before paddle loads

from ernie5.runconfig import load_config


@pytest.fixture(scope="session")
def tok_model(tmp_path_factory) -> Path:
    """A 400-piece BPE sentencepiece model trained by ernie5 (byte fallback, dummy prefix)."""
    from ernie5.data.corpus import pydoc_documents
    from ernie5.modality.text_tokenizer import train_text_tokenizer

    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(pydoc_documents()[:20] + ["人民日报一九九八年新年献词。"] * 3) + "\n", encoding="utf-8")
    cfg = load_config(None, [f"tokenizer.model_path={root / 'tok.model'}", f"tokenizer.corpus=[{corpus}]",
                             "tokenizer.vocab_size=400", "tokenizer.input_sentence_size=0"])
    return train_text_tokenizer(cfg.tokenizer)
