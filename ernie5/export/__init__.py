"""Leaving and entering ernie5: Hugging Face ERNIE 4.5 checkpoints (`hf`) and native safetensors exports."""

from ernie5.export.hf import export_hf, import_hf, load_pretrained_state
from ernie5.export.native import export_native

__all__ = ["export_hf", "import_hf", "load_pretrained_state", "export_native"]
