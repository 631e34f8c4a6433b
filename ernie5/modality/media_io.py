"""Tokenizer recipes (YAML under `tokenizers/`) and trained tokenizer assets (`.safetensors` + `.json`).

A recipe's top-level `kind` picks the tokenizer (`text` recipes are ordinary run configs and keep their own
path); `vision` and `audio` recipes build `TokenizerRecipe`. A trained asset is `OUTPUT.safetensors` (weights)
with `OUTPUT.json` beside it (the recipe's model config and the held-out report), so it loads without the recipe.
Neither format can run code when loaded. Assets from older versions were pickles (`OUTPUT.pdparams`); they load
only with ERNIE5_ALLOW_PICKLE=1, since unpickling an untrusted file can run arbitrary code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ernie5.config.schema import build, join, require, to_dict
from ernie5.config.yaml_io import apply_overrides, load_yaml
from ernie5.errors import UserError
from ernie5.tensor_io import load_state_file, save_tensors
from ernie5.modality.audio import AudioTokenizerConfig
from ernie5.modality.vision import VisionTokenizerConfig

TEACHERS = ("none", "random_conv")  # pluggable feature teachers; real ones (a ViT, Whisper) register here


@dataclass
class MediaTrainConfig:
    """Optimisation of a vision / audio tokenizer (kept small: minutes on 2 CPU cores)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 2.0e-3
    min_lr: float = 2.0e-4
    video_every: int = 4  # vision: every n-th step is a video batch (0: images only)
    video_batch_size: int = 8
    crop_seconds: float = 0.8  # audio: random crop length
    disc_start: int = 100  # vision with adversarial_weight > 0: discriminator joins at this step
    teacher: str = "none"
    log_every: int = 50

    def validate(self, path: str) -> None:
        require(self.steps >= 1, join(path, "steps"), "must be >= 1")
        require(self.batch_size >= 1, join(path, "batch_size"), "must be >= 1")
        require(self.lr > 0, join(path, "lr"), "must be > 0")
        require(self.teacher in TEACHERS, join(path, "teacher"), f"{self.teacher!r} is not one of {TEACHERS}")


@dataclass
class TokenizerRecipe:
    """`ernie5 tokenizer train RECIPE.yaml` for kind vision / audio."""

    kind: Literal["vision", "audio"] = "vision"
    output: str = "tokenizers/vision.safetensors"
    data_dir: str = "data/raw/digits_world"
    init_from: str | None = None  # a trained asset of the same kind (vision: fewer bits -> progressive widths)
    seed: int = 0
    vision: VisionTokenizerConfig = field(default_factory=VisionTokenizerConfig)
    audio: AudioTokenizerConfig = field(default_factory=AudioTokenizerConfig)
    train: MediaTrainConfig = field(default_factory=MediaTrainConfig)

    def validate(self, path: str) -> None:
        require(self.output.endswith(".safetensors"), join(path, "output"),
                f"{self.output!r} must end in .safetensors")


def load_recipe(path: str, overrides: list[str] = ()) -> TokenizerRecipe:
    return build(TokenizerRecipe, apply_overrides(load_yaml(Path(path)), list(overrides)), "")


def save_asset(recipe: TokenizerRecipe, model, report: dict) -> Path:
    """Write OUTPUT.safetensors and OUTPUT.json (atomically: temp file then rename)."""
    out = Path(recipe.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".safetensors.tmp")
    save_tensors(model.state_dict())(tmp)
    tmp.replace(out)
    meta = {"kind": recipe.kind, "config": to_dict(getattr(recipe, recipe.kind)), "report": report}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    return out


def load_asset(path: str):
    """A trained vision / audio tokenizer (eval mode) from OUTPUT.safetensors + OUTPUT.json."""
    from ernie5.modality.audio import AudioTokenizer
    from ernie5.modality.vision import VisionTokenizer

    p = Path(path)
    meta_path = p.with_suffix(".json")
    if not p.is_file() or not meta_path.is_file():
        raise UserError(str(p), "tokenizer asset not found (run `ernie5 tokenizer train` on its recipe)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(str(meta_path), f"unreadable tokenizer asset ({e})") from None
    state = _load_weights(p)
    if meta.get("kind") == "vision":
        model = VisionTokenizer(build(VisionTokenizerConfig, meta["config"], "vision"))
    elif meta.get("kind") == "audio":
        model = AudioTokenizer(build(AudioTokenizerConfig, meta["config"], "audio"))
    else:
        raise UserError(str(meta_path), f"unknown tokenizer kind {meta.get('kind')!r}")
    wanted = model.state_dict()  # teacher projections are training-only: not part of the tokenizer
    model.set_state_dict({k: v for k, v in state.items() if k in wanted})
    model.eval()
    return model


def _load_weights(p: Path) -> dict:
    """The asset's weights. safetensors content is read as such whatever the file is called; a `.safetensors`
    name is never unpickled; any other file is a legacy pickle, loaded only with the opt-in."""
    return load_state_file(p, what="tokenizer asset", remedy=" (or retrain it with `ernie5 tokenizer train`)")
