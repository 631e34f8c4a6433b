"""Text tokenizer: sentencepiece BPE with byte fallback, trained by `ernie5 tokenizer train`."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ernie5.config.schema import join, require
from ernie5.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


@dataclass
class TextTokenizerConfig:
    """Where the model lives and how it is trained (`corpus`: text files, one document per line)."""

    model_path: str = "tokenizers/text.model"
    corpus: list[str] = field(default_factory=list)
    vocab_size: int = 8000
    character_coverage: float = 0.9995  # < 1 so rare CJK characters fall back to bytes
    max_sentence_length: int = 16384
    input_sentence_size: int = 200000  # lines sampled for training (0: all)

    def validate(self, path: str) -> None:
        require(self.vocab_size >= 300, join(path, "vocab_size"),
                f"{self.vocab_size} must be >= 300 (256 byte-fallback pieces + specials + merges)")
        require(0 < self.character_coverage <= 1, join(path, "character_coverage"), "must be in (0, 1]")


@contextlib.contextmanager
def _stderr_fd_to(f):
    """Send file descriptor 2 (where sentencepiece's C++ logger writes) to `f` for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(f.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def train_text_tokenizer(cfg: TextTokenizerConfig, seed: int = 0) -> Path:
    """Train the BPE model on `cfg.corpus`; write `cfg.model_path` (+ .vocab). Returns the model path."""
    import sentencepiece as spm

    if not cfg.corpus:
        raise UserError("tokenizer.corpus", "no corpus files configured")
    for f in cfg.corpus:
        if not os.path.isfile(f):
            raise UserError(f, "corpus file not found (run `ernie5 data fetch` first?)")
    out = Path(cfg.model_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = str(out.with_suffix(""))
    spm.set_random_generator_seed(seed)  # input sampling is then reproducible
    try:
        with open(prefix + ".train.log", "w") as log, _stderr_fd_to(log):
            spm.SentencePieceTrainer.train(
                input=",".join(cfg.corpus), model_prefix=prefix, vocab_size=cfg.vocab_size, model_type="bpe",
                byte_fallback=True, character_coverage=cfg.character_coverage,
                max_sentence_length=cfg.max_sentence_length, input_sentence_size=cfg.input_sentence_size,
                shuffle_input_sentence=True, seed_sentencepiece_size=1000000,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, num_threads=os.cpu_count() or 1,
                split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            )
    except RuntimeError as e:  # sentencepiece reports bad settings (e.g. vocab too large) as RuntimeError
        raise UserError("tokenizer", f"sentencepiece training failed: {str(e).strip().splitlines()[-1]}") from None
    return out.with_suffix(".model")


class TextTokenizer:
    """Thin wrapper over a trained sentencepiece model; `dropout` > 0 samples BPE merges (BPE-dropout)."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise UserError(model_path, "tokenizer model not found (run `ernie5 tokenizer train CONFIG`)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(model_path)
        except (OSError, RuntimeError):
            raise UserError(model_path, "not a readable sentencepiece model") from None
        self.path = model_path
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, dropout: float = 0.0) -> list[int]:
        if dropout > 0:
            return self.sp.encode(text, enable_sampling=True, alpha=dropout, nbest_size=-1)
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
