"""Data configs (paddle-free)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ernie5.config.schema import join, require

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class SourceConfig:
    """One corpus in the training mixture.

    `paths`: files or globs (text sources), or one prepared multimodal shard directory (`format: multimodal`).
    `format`: `text` (one document per line), `jsonl` (one JSON object per line, the document in `field`),
    `parquet` (the document in column `field`), `multimodal` (shards of `ernie5 data prepare` on a multimodal
    config); chosen from the file extension when omitted (`.txt`, `.jsonl` / `.json`, `.parquet`; a `.gz` or
    `.zst` suffix is read transparently). `weight`: the source's share of training rows (weights are normalised;
    0 keeps a source for held-out evaluation only).
    """

    name: str = ""
    paths: list[str] = field(default_factory=list)
    format: Optional[Literal["text", "jsonl", "parquet", "multimodal"]] = None
    field: str = "text"
    weight: float = 1.0

    def validate(self, path: str) -> None:
        require(bool(_NAME.match(self.name)), join(path, "name"),
                f"{self.name!r}: a source needs a name of letters, digits, '_', '.', '-' (it names a directory)")
        require(bool(self.paths), join(path, "paths"), "no files or globs given")
        require(self.weight >= 0, join(path, "weight"), f"{self.weight} must be >= 0")
        if self.format == "multimodal":
            require(len(self.paths) == 1, join(path, "paths"), "a multimodal source is one shard directory")

    @property
    def is_multimodal(self) -> bool:
        return self.format == "multimodal"


@dataclass
class ResolvedSource:
    """A source with the directory its shards live in (`DataConfig.resolved_sources`)."""

    name: str
    dir: str
    weight: float
    config: SourceConfig


@dataclass
class DataConfig:
    """Token shards, the mixture of sources they come from, and how they are packed into rows.

    Two forms. With `sources` (a list of `SourceConfig`), `ernie5 data prepare` tokenises each text source into
    `dir/<name>/` and training draws rows from the sources by weight. Without it, the single-corpus form:
    `tokenizer.corpus` (text files) is prepared into `dir` itself, or `dir` names multimodal shards. Training
    packs documents (EOS-separated) into rows of `seq_len` tokens with no attention across document boundaries.
    """

    dir: str = "data/shards/text"
    sources: list[SourceConfig] = field(default_factory=list)
    seq_len: int = 256
    val_fraction: float = 0.02  # documents held out (deterministic: seeded per preparation unit)
    bpe_dropout: float = 0.0  # > 0: train split tokenised with BPE-dropout (sampled merges)
    bpe_dropout_copies: int = 1  # that many differently sampled passes of the train split are stored in the shard
    synthetic: bool = False  # uniform random tokens, no files (benchmarks)
    verify_checksums: bool = True  # sha256 of every shard file at start (~2 s per GB); sizes are always checked

    def validate(self, path: str) -> None:
        require(self.seq_len >= 2, join(path, "seq_len"), f"{self.seq_len} must be >= 2")
        require(0 <= self.val_fraction < 1, join(path, "val_fraction"), "must be in [0, 1)")
        require(0 <= self.bpe_dropout < 1, join(path, "bpe_dropout"), "must be in [0, 1)")
        require(self.bpe_dropout_copies >= 1, join(path, "bpe_dropout_copies"), "must be >= 1")
        if self.sources:
            names = [s.name for s in self.sources]
            dup = next((n for n in names if names.count(n) > 1), None)
            require(dup is None, join(path, "sources"), f"two sources are named {dup!r}")
            require(sum(s.weight for s in self.sources) > 0, join(path, "sources"),
                    "every weight is 0: at least one source must have a positive weight")

    def resolved_sources(self, corpus: list[str]) -> list[ResolvedSource]:
        """The mixture as (name, shard directory, normalised weight). The single-corpus form is one source:
        `corpus` (the tokenizer's text files) prepared into `dir`, or the multimodal shards in `dir`."""
        if not self.sources:
            if _is_multimodal_dir(self.dir):
                src = SourceConfig(name=Path(self.dir).name or "multimodal", paths=[self.dir], format="multimodal")
            else:
                src = SourceConfig(name="corpus", paths=list(corpus), format="text")
            return [ResolvedSource(src.name, self.dir, 1.0, src)]
        total = sum(s.weight for s in self.sources)
        return [ResolvedSource(s.name, s.paths[0] if s.is_multimodal else str(Path(self.dir) / s.name),
                               s.weight / total, s) for s in self.sources]


def _is_multimodal_dir(shard_dir: str) -> bool:
    import json

    meta = Path(shard_dir) / "meta.json"
    try:  # any version: an older one is refused with its own message when opened (`read_multimodal_meta`)
        return meta.is_file() and str(json.loads(meta.read_text(encoding="utf-8")).get("format")).startswith(
            "multimodal-")
    except (OSError, ValueError):
        return False
