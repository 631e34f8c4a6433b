"""ernie5: PaddlePaddle pretraining for unified multimodal MoE models in the style of ERNIE 5.0.

Importing the package has no side effects; `ernie5.env.setup()` applies the CPU thread settings (the CLI and
`load_model` call it).
"""

__version__ = "0.1.0"


def load_model(path):
    """Load a checkpoint directory (or a run directory: its newest checkpoint); returns the model in eval mode."""
    from ernie5.env import setup

    setup()
    from ernie5.train.checkpoint import load_model as _load

    return _load(path)


__all__ = ["load_model", "__version__"]
