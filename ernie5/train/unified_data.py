"""Feeding multimodal shards to the trainer: model sizes from the shards' meta.json, loaders, batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ernie5.data.blend import BlendedLoader, source_seed
from ernie5.data.loader import MultimodalLoader, UnifiedTextLoader
from ernie5.data.multimodal_prepare import open_multimodal_split, read_multimodal_meta
from ernie5.data.shards import open_split, read_meta, sha256_file
from ernie5.data.sequence import SPECIALS
from ernie5.errors import UserError


_LAYOUT = ("seq_len", "text_vocab_size", "eos_id", "bits", "scales", "audio_levels", "audio_codebook",
           "und_cnn_dim", "und_pix_dim", "und_patches", "specials")


def check_same_layout(meta: dict, other: dict, name: str) -> None:
    """Multimodal sources blend only when their rows mean the same thing (tokenizers, row length, features)."""
    for key in _LAYOUT:
        if meta.get(key) != other.get(key):
            raise UserError(f"data.sources ({name})", f"{key} {other.get(key)} differs from the first multimodal "
                                                      f"source's {meta.get(key)} (prepare both with one tokenizer set)")


def check_text_tokenizer(meta: dict, text_meta: dict, name: str) -> None:
    """A text source blended into multimodal rows must use the multimodal shards' text tokenizer: the same file
    (sha256) when the shards' tokenizer file is at hand, else at least the same vocabulary size and EOS."""
    for key, mm_key in (("vocab_size", "text_vocab_size"), ("eos_id", "eos_id")):
        if int(text_meta[key]) != int(meta[mm_key]):
            raise UserError(f"data.sources ({name})", f"text {key} {text_meta[key]} != the multimodal shards' "
                                                      f"{meta[mm_key]} (tokenise it with their text tokenizer)")
    path = Path(meta.get("text_tokenizer") or "")
    if path.is_file() and text_meta.get("tokenizer_sha256") not in (None, sha256_file(path)):
        raise UserError(f"data.sources ({name})", f"tokenised with another tokenizer than the multimodal shards' "
                                                  f"{path} (prepare it with tokenizer.model_path={path})")


def multimodal_meta(cfg) -> dict:
    """meta.json of the first multimodal source of the run's mixture."""
    src = next(s for s in cfg.data.resolved_sources(cfg.tokenizer.corpus) if s.config.is_multimodal)
    return read_multimodal_meta(src.dir)


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
            raise UserError(f"model.multimodal.{name}", f"{have} != {value} in the multimodal shards' meta.json")
        setattr(mm, name, int(value))
    mm.enabled = True


_FLIP_STREAM = 0xB17F  # tags the bit-flip seeds apart from the loader's [seed, epoch] shuffle seeds


class UnifiedBatches:
    """Train / val loaders over the mixture's sources and the numpy -> tensor batch step.

    Multimodal sources are packed multimodal shards (they must agree on the tokenizers and row layout); text
    sources are packed text rows laid out as text-only unified rows (`UnifiedTextLoader`), so a mixture such as
    image-caption pairs 0.4, speech 0.2, text 0.4 is one weighted blend."""

    def __init__(self, cfg, rank: int, world: int, notice=None):
        from ernie5.objectives.unified import make_unified_batch  # paddle-importing module

        self._make = make_unified_batch
        d, t = cfg.data, cfg.train
        self.cfg, self.seed, self.rank = cfg, cfg.run.seed, rank
        sources = d.resolved_sources(cfg.tokenizer.corpus)
        first_mm = next(s for s in sources if s.config.is_multimodal)
        self.meta = read_multimodal_meta(first_mm.dir)
        und_shape = (self.meta["und_patches"], self.meta["und_cnn_dim"] + self.meta["und_pix_dim"])
        parts, self.val, B = [], {}, t.micro_batch_size
        for i, src in enumerate(sources):
            seed = source_seed(self.seed, i, len(sources))
            if src.config.is_multimodal:
                meta, train = open_multimodal_split(src.dir, "train")
                check_same_layout(self.meta, meta, src.name)
                parts.append((src.name, MultimodalLoader(train, B, seed, where=f"{src.dir} (train)"), src.weight))
                if "val" in meta["splits"] and meta["splits"]["val"]["rows"]:
                    _, val = open_multimodal_split(src.dir, "val")
                    self.val[src.name] = MultimodalLoader(val, B, self.seed, shuffle=False, where=f"{src.dir} (val)")
                continue
            check_text_tokenizer(self.meta, read_meta(src.dir), src.name)
            kw = dict(bits=self.meta["bits"], levels=self.meta["audio_levels"], und_shape=und_shape)
            parts.append((src.name, UnifiedTextLoader(open_split(src.dir, "train", verify=d.verify_checksums),
                                                      d.seq_len, B, seed,
                                                      where=f"{src.dir} (source {src.name}, train)", **kw),
                          src.weight))
            val = open_split(src.dir, "val", verify=d.verify_checksums)
            if val.num_tokens > d.seq_len:
                self.val[src.name] = UnifiedTextLoader(val, d.seq_len, B, self.seed, shuffle=False,
                                                       where=f"{src.dir} (source {src.name}, val)", **kw)
        self.weights = {src.name: src.weight for src in sources}
        self.train = BlendedLoader(parts, B, rank, world, notice)
        self.maps = None
        if cfg.objective.bit_flip_rate > 0:  # every multimodal source's maps: each covers its own latent grids
            self.maps = {}
            for src in sources:
                if not src.config.is_multimodal:
                    continue
                maps = Path(src.dir) / "vis_history.npz"
                if not maps.is_file():
                    raise UserError(str(maps), "missing (re-run `ernie5 data prepare`): bit-flip corruption needs it")
                with np.load(maps) as z:
                    self.maps.update({k: z[k] for k in z.files})

    def batch(self, loader, train: bool = True) -> dict:
        import paddle

        # each row's corruption draw is keyed by (seed, its global row number): resumable, different on every
        # data-parallel rank (rank r reads rows position + r*B ...), and the same whatever the rank count
        first = loader.position + loader.rank * loader.B
        keys = [[self.seed, _FLIP_STREAM, first + b] for b in range(loader.B)]
        rows = loader.next()
        mm = self.cfg.model.multimodal
        b = self._make(rows, scales=self.meta["scales"], audio_end=mm.audio_codebook, specials=self.meta["specials"],
                       mtp_depth=self.cfg.model.mtp.depth, cfg=self.cfg.objective,
                       maps=self.maps if train else None, row_keys=keys, temporal_window=mm.temporal_window,
                       train=train)
        return {k: paddle.to_tensor(v) for k, v in b.items()}
