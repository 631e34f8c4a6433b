"""Data configs (paddle-free)."""

from __future__ import annotations

from dataclasses import dataclass

from ernie5.config.schema import join, require


@dataclass
class DataConfig:
    """Token shards and how they are packed into rows.

    `ernie5 data prepare` tokenises `tokenizer.corpus` into `dir/train` and `dir/val`; training packs documents
    (EOS-separated) into rows of `seq_len` tokens with no attention across document boundaries.
    """

    dir: str = "data/shards/text"
    seq_len: int = 256
    val_fraction: float = 0.02  # documents held out (deterministic by hash of the document index)
    bpe_dropout: float = 0.0  # > 0: train split tokenised with BPE-dropout (sampled merges)
    bpe_dropout_copies: int = 1  # that many differently sampled passes of the train split are stored in the shard
    synthetic: bool = False  # uniform random tokens, no files (benchmarks)

    def validate(self, path: str) -> None:
        require(self.seq_len >= 2, join(path, "seq_len"), f"{self.seq_len} must be >= 2")
        require(0 <= self.val_fraction < 1, join(path, "val_fraction"), "must be in [0, 1)")
        require(0 <= self.bpe_dropout < 1, join(path, "bpe_dropout"), "must be in [0, 1)")
        require(self.bpe_dropout_copies >= 1, join(path, "bpe_dropout_copies"), "must be >= 1")
