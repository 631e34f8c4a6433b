"""`ernie5 tokenizer train RECIPE` for vision / audio recipes: dispatch to `vision_train` or `audio_train`."""

from __future__ import annotations

import numpy as np
import paddle

from ernie5.modality.media_io import TokenizerRecipe
from ernie5.tools.audio_train import train_audio
from ernie5.tools.vision_train import train_vision


def train_tokenizer(recipe: TokenizerRecipe, log=print) -> dict:
    paddle.seed(recipe.seed)
    np.random.seed(recipe.seed)
    if recipe.kind == "vision":
        return train_vision(recipe, log)
    return train_audio(recipe, log)
