"""Feeding multimodal shards to the trainer: model sizes from the shards' meta.json, loaders, batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ernie5.constants import MULTIMODAL_FORMAT
from ernie5.data.loader import MultimodalLoader
from ernie5.data.multimodal_prepare import open_multimodal_split
from ernie5.data.sequence import SPECIALS
from ernie5.errors import UserError


def is_multimodal_shard(shard_dir: str) -> bool:
    import json

    meta = Path(shard_dir) / "meta.json"
    try:
        return meta.is_file() and json.loads(meta.read_text(encoding="utf-8")).get("format") == MULTIMODAL_FORMAT
    except (OSError, ValueError):
        return False  # the text path reports an unreadable meta.json with its own message


def resolve_multimodal(cfg, meta: dict) -> None:
    """Fill model.vocab_size and model.multimodal of `cfg` from the shards (or check what it already says).
    Called on the trainer's own copy of the run config (`ernie5.train.resolve.resolve_run_config`)."""
    d, mm = cfg.data, cfg.model.multimodal
    if d.seq_len != meta["seq_len"]:
        raise UserError("data.seq_len", f"{d.seq_len} != the multimodal shards' row length {meta['seq_len']}")
    vocab = int(meta["text_vocab_size"]) + len(SPECIALS)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size < vocab:
        raise UserError("model.vocab_size", f"{cfg.model.vocab_size} < text vocabulary + specials {vocab}")
    want = {"visual_bits": meta["bits"], "num_scales": len(meta["scales"]), "audio_levels": meta["audio_levels"],
            "audio_codebook": meta["audio_codebook"], "und_cnn_dim": meta["und_cnn_dim"],
            "und_pix_dim": meta["und_pix_dim"], "und_patches": meta["und_patches"]}
    for name, value in want.items():
        have = getattr(mm, name)
        if have and have != value:
            raise UserError(f"model.multimodal.{name}", f"{have} != {value} in {d.dir}/meta.json")
        setattr(mm, name, int(value))
    mm.enabled = True


_FLIP_STREAM = 0xB17F  # tags the bit-flip seeds apart from the loader's [seed, epoch] shuffle seeds


class UnifiedBatches:
    """Train / val loaders over the multimodal shards and the numpy -> tensor batch step."""

    def __init__(self, cfg, rank: int, world: int):
        from ernie5.objectives.unified import make_unified_batch  # paddle-importing module

        self._make = make_unified_batch
        d, t = cfg.data, cfg.train
        self.cfg, self.seed, self.rank = cfg, cfg.run.seed, rank
        self.meta, train = open_multimodal_split(d.dir, "train")
        self.train = MultimodalLoader(train, t.micro_batch_size, self.seed, rank, world, where=f"{d.dir} (train)")
        self.val = None
        if "val" in self.meta["splits"] and self.meta["splits"]["val"]["rows"]:
            _, val = open_multimodal_split(d.dir, "val")
            self.val = MultimodalLoader(val, t.micro_batch_size, self.seed, shuffle=False, where=f"{d.dir} (val)")
        maps = Path(d.dir) / "vis_history.npz"
        self.maps = None
        if cfg.objective.bit_flip_rate > 0:
            if not maps.is_file():
                raise UserError(str(maps), "missing (re-run `ernie5 data prepare`): bit-flip corruption needs it")
            with np.load(maps) as z:
                self.maps = {k: z[k] for k in z.files}

    def batch(self, loader: MultimodalLoader, train: bool = True) -> dict:
        import paddle

        # each row's corruption draw is keyed by (seed, its global row number): resumable, different on every
        # data-parallel rank (rank r reads rows position + r*B ...), and the same whatever the rank count
        first = loader.position + loader.rank * loader.B
        keys = [[self.seed, _FLIP_STREAM, first + b] for b in range(loader.B)]
        rows = loader.next()
        mm = self.cfg.model.multimodal
        b = self._make(rows, scales=self.meta["scales"], audio_end=mm.audio_codebook, specials=self.meta["specials"],
                       mtp_depth=self.cfg.model.mtp.depth, cfg=self.cfg.objective,
                       maps=self.maps if train else None, row_keys=keys)
        return {k: paddle.to_tensor(v) for k, v in b.items()}
